"""A tiny NumPy bigram LM implementing the prefopt._core.Model contract (csrc/README.md).

Used only to test the run orchestration (ordering, accumulation, checkpoint/resume,
interrupts, NaN handling) independently of the C core; the C core itself is tested
elsewhere, and tests/test_train.py runs the same checks on a tiny random C model.

p(token_t | token_{t-1}) = softmax(E[prev] @ M @ E^T), M = W + s * sum_t B_t A_t.
"""
import numpy as np

from prefopt.evaluate import objective_terms_numpy as objective_terms

TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


class ToyModel:
    def __init__(self, vocab=32, dim=8, seed=0):
        r = np.random.default_rng(seed)
        self.V, self.D = vocab, dim
        self.E = r.normal(0, 1.0, (vocab, dim)).astype(np.float32)
        self.W = r.normal(0, 0.5, (dim, dim)).astype(np.float32)
        self.lora = None
        self.adam_step = 0
        self.calls = []  # (kind, P, weight) for accumulation checks

    # --- LoRA ------------------------------------------------------------------
    def lora_init(self, rank, alpha, targets, use_rslora=False, dropout=0.0, seed=0):
        targets = list(targets)
        r = np.random.default_rng(seed)
        params = {}
        for t in targets:
            name = self._name(t)
            bound = 1 / np.sqrt(self.D)
            params[f"{name}.lora_A.weight"] = r.uniform(-bound, bound, (rank, self.D)).astype(np.float32)
            params[f"{name}.lora_B.weight"] = np.zeros((self.D, rank), np.float32)
        scale = alpha / (np.sqrt(rank) if use_rslora else rank)
        z = {k: np.zeros_like(v) for k, v in params.items()}
        self.lora = {"rank": rank, "alpha": alpha, "targets": targets, "scale": scale,
                     "dropout": dropout, "use_rslora": use_rslora,
                     "params": params, "grads": dict(z),
                     "adam_m": {k: v.copy() for k, v in z.items()},
                     "adam_v": {k: v.copy() for k, v in z.items()}}
        self.lora["grads"] = {k: v.copy() for k, v in z.items()}
        self.adam_step = 0

    @staticmethod
    def _name(t):
        parent = "mlp" if t in ("gate_proj", "up_proj", "down_proj") else "self_attn"
        return f"model.layers.0.{parent}.{t}"

    def lora_remove(self):
        self.lora = None
        self.adam_step = 0

    def lora_info(self):
        if self.lora is None:
            return None
        return {k: self.lora[k] for k in ("rank", "alpha", "targets", "scale", "dropout", "use_rslora")}

    def lora_state(self, arena="params"):
        return {k: v.copy() for k, v in self.lora[arena].items()}

    def lora_load_state(self, state, arena="params"):
        cur = self.lora[arena]
        if set(state) != set(cur):
            raise ValueError("names differ")
        for k in cur:
            a = np.asarray(state[k], np.float32)
            if a.shape != cur[k].shape:
                raise ValueError(f"shape of {k}")
            cur[k] = a.copy()

    def _M(self, use_lora):
        M = self.W.astype(np.float64)
        if use_lora and self.lora is not None:
            p, s = self.lora["params"], self.lora["scale"]
            for t in self.lora["targets"]:
                n = self._name(t)
                M = M + s * (p[n + ".lora_B.weight"].astype(np.float64) @ p[n + ".lora_A.weight"])
        return M

    # --- scoring -------------------------------------------------------------------
    def _positions(self, tokens, segments):
        """(pair, which, context token, target token) for every completion token."""
        out = []
        off = 0
        for p, (lp, lc, lr) in enumerate(np.asarray(segments)):
            prompt = tokens[off:off + lp]
            ch = tokens[off + lp: off + lp + lc]
            rj = tokens[off + lp + lc: off + lp + lc + lr]
            for which, comp in ((0, ch), (1, rj)):
                prev = prompt[-1]
                for t in comp:
                    out.append((p, which, int(prev), int(t)))
                    prev = t
            off += lp + lc + lr
        if off != len(tokens):
            raise ValueError("segments do not cover tokens")
        return out

    def _forward(self, tokens, segments, use_lora):
        if tokens.dtype != np.int32 or segments.dtype != np.int32:
            raise TypeError("int32 required")
        if tokens.size and (tokens.min() < 0 or tokens.max() >= self.V):
            raise ValueError("token id out of range")
        M = self._M(use_lora)
        pos = self._positions(tokens, segments)
        P = len(segments)
        logp = np.zeros((P, 2))
        n = np.zeros((P, 2), np.int32)
        per = []
        E = self.E.astype(np.float64)
        cache = []
        for p, w, c, y in pos:
            h = E[c]
            z = h @ M
            logits = z @ E.T
            lse = np.logaddexp.reduce(logits)
            lp_ = logits[y] - lse
            logp[p, w] += lp_
            n[p, w] += 1
            per.append(lp_)
            cache.append((p, w, h, logits, lse, y))
        return logp, n, np.array(per, np.float32), cache

    def score(self, tokens, segments, use_lora=True, per_token=False):
        logp, n, per, _ = self._forward(tokens, segments, use_lora)
        out = {"logp": logp, "n": n}
        if per_token:
            out["per_token"] = per
        return out

    def train_step(self, tokens, segments, ref, objective, weight, dropout_seed):
        self.calls.append(("train_step", len(segments), weight))
        logp, n, _, cache = self._forward(tokens, segments, True)
        ref = np.asarray(ref, np.float64)
        args = (logp[:, 0], logp[:, 1], ref[:, 0], ref[:, 1], n[:, 0], n[:, 1])
        terms = objective_terms(objective, *args)
        if not np.all(np.isfinite(terms["loss"])):
            raise FloatingPointError("non-finite loss")
        # d loss / d Lc, d Lr by central differences on the (smooth) objective
        h = 1e-6
        dL = np.zeros_like(logp)
        for w in (0, 1):
            a = [x.copy() for x in args[:2]]
            b = [x.copy() for x in args[:2]]
            a[w] += h
            b[w] -= h
            la = objective_terms(objective, a[0], a[1], *args[2:])["loss"]
            lb = objective_terms(objective, b[0], b[1], *args[2:])["loss"]
            dL[:, w] = (la - lb) / (2 * h)
        E = self.E.astype(np.float64)
        dM = np.zeros((self.D, self.D))
        for p, w, hvec, logits, lse, y in cache:
            g = -np.exp(logits - lse)
            g[y] += 1.0
            dz = (g @ E) * dL[p, w] * weight
            dM += np.outer(hvec, dz)
        pr, gr, s = self.lora["params"], self.lora["grads"], self.lora["scale"]
        for t in self.lora["targets"]:
            nm = self._name(t)
            A = pr[nm + ".lora_A.weight"].astype(np.float64)
            B = pr[nm + ".lora_B.weight"].astype(np.float64)
            gr[nm + ".lora_B.weight"] += (s * dM @ A.T).astype(np.float32)
            gr[nm + ".lora_A.weight"] += (s * B.T @ dM).astype(np.float32)
        return {"logp": logp, "n": n, "loss": terms["loss"],
                "reward": np.stack([terms["reward_c"], terms["reward_r"]], 1),
                "nll": terms["nll"], "log_odds": terms["log_odds"],
                "log_sig_odds": terms["log_sig_odds"]}

    def zero_grad(self):
        for v in self.lora["grads"].values():
            v[...] = 0

    def grad_norm(self):
        return float(np.sqrt(sum(float(np.sum(g.astype(np.float64) ** 2))
                                 for g in self.lora["grads"].values())))

    def optimizer_step(self, lr, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.0,
                       max_grad_norm=0.0):
        gn = self.grad_norm()
        if not np.isfinite(gn):
            raise FloatingPointError("non-finite gradient")
        scale = min(1.0, max_grad_norm / (gn + 1e-6)) if max_grad_norm > 0 else 1.0
        self.adam_step += 1
        t = self.adam_step
        L = self.lora
        for k in L["params"]:
            g = L["grads"][k] * np.float32(scale)
            p = L["params"][k]
            p *= np.float32(1 - lr * weight_decay)
            L["adam_m"][k] = np.float32(beta1) * L["adam_m"][k] + np.float32(1 - beta1) * g
            L["adam_v"][k] = np.float32(beta2) * L["adam_v"][k] + np.float32(1 - beta2) * g * g
            mh = L["adam_m"][k] / np.float32(1 - beta1 ** t)
            vh = L["adam_v"][k] / np.float32(1 - beta2 ** t)
            p -= np.float32(lr) * mh / (np.sqrt(vh) + np.float32(eps))
        return gn

    def generate(self, prompt_ids, max_new_tokens, stop_ids, use_lora=True):
        M = self._M(use_lora)
        E = self.E.astype(np.float64)
        out = []
        prev = int(prompt_ids[-1])
        for _ in range(max_new_tokens):
            nxt = int(np.argmax((E[prev] @ M) @ E.T))
            out.append(nxt)
            if nxt in set(int(s) for s in stop_ids):
                break
            prev = nxt
        return np.array(out, np.int32)


def random_pairs(n, vocab=32, seed=0, slices=("a", "b")):
    """Random tokenised pairs with varied lengths."""
    from prefopt.batching import TokenPair

    r = np.random.default_rng(seed)
    out = []
    for i in range(n):
        lp, lc, lr = r.integers(2, 6), r.integers(1, 6), r.integers(1, 6)
        out.append(TokenPair(r.integers(0, vocab, lp).astype(np.int32),
                             r.integers(0, vocab, lc).astype(np.int32),
                             r.integers(0, vocab, lr).astype(np.int32),
                             id=f"p{i}", slice=slices[i % len(slices)]))
    return out
