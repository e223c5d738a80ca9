"""The one piece of file handling GGUF and safetensors readers share: an mmap that is
closed explicitly, by ``with``, or at garbage collection while array views still use it."""


class MmapBacked:
    """Mixin for readers holding ``self._mm`` (an ``mmap.mmap`` or None)."""

    def close(self):
        """Release the mmap (deferred to garbage collection while array views exist)."""
        mm, self._mm = getattr(self, "_mm", None), None
        if mm is not None:
            try:
                mm.close()
            except BufferError:
                pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
