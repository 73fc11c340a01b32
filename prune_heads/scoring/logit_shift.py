"""KL and loss change of a perturbed model from its final hidden states, without a log-softmax.

Batched ablations run the LM head once per ablated copy. The direct formula then needs a
log-softmax and a KL over the whole vocabulary for every copy; this module needs one elementwise
pass. With a linear head, logits ``z = W h + b``, reference distribution ``p`` and a copy's logit
shift ``d = W (h_q - h_p)`` (the bias cancels)::

    log sum_v p_v e^{d_v} = lse(z_q) - lse(z_p) = log(1 + A + B)
    A = sum_v p_v (e^{d_v} - 1 - d_v)      (every term >= 0)
    B = sum_v p_v d_v = u . (h_q - h_p),    u = p W   (once per batch)
    KL(p || q) = log(1 + A + B) - B,        loss_q - loss_p = log(1 + A + B) - d_target

Summing the non-negative terms of ``A`` in float32 loses nothing to cancellation, so the result is
*more* accurate than the direct float32 formula (a 49k-term log-sum-exp carries about 1e-5 of
summation error, the size of a quiet head's KL). Two regimes need care and get float64:
a copy that moves most of ``p``'s mass away (``1 + A + B`` near 0 cancels), and logit rises so large
that ``p e^d`` matters where float32 ``p`` underflowed.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

#: size of the (rows, vocab) logit block handled at once on CPU (about what stays in cache)
CHUNK_BYTES = 2**25
#: largest logit rise for which float32 ``p (e^d - 1 - d)`` loses nothing: float32 ``p`` underflows
#: below e^-103, so a token needs d > 60 before an underflowed term could reach e^-40
FAST_MAX_D = 60.0
#: below this ``1 + A + B`` the log-sum-exp is taken directly
CANCEL_LIMIT = 0.5
#: vocabulary rows of the LM head converted to float64 at once when building ``u``
VOCAB_CHUNK = 8192


@dataclass
class LinearHeadReference:
    """What the per-copy computation needs from the reference pass, for ``N`` positions."""

    weight: torch.Tensor  # (V, D) LM-head weight
    hidden: torch.Tensor  # (N, D) float32 final normed hidden states of the reference
    p: torch.Tensor  # (N, V) float32 reference probabilities
    log_p: torch.Tensor  # (N, V) float32 reference log-probabilities
    u: torch.Tensor  # (N, D) float64, p W
    p_sum: torch.Tensor  # (N,) float64, sum_v p_v: 1 up to float32 rounding, divided out exactly

    @classmethod
    def build(cls, weight: torch.Tensor, hidden: torch.Tensor, log_p: torch.Tensor) -> LinearHeadReference:
        """From the reference's hidden states ``(N, D)`` and log-probabilities ``(N, V)``."""
        p = log_p.float().exp()
        n, vocab = p.shape
        u = torch.zeros(n, weight.shape[1], dtype=torch.float64, device=p.device)
        p_sum = torch.zeros(n, dtype=torch.float64, device=p.device)
        # float64 (an error in u enters the KL undamped when a copy moves the logits far), one
        # vocabulary chunk at a time so no float64 copy of the whole LM head or of p is made
        for v in range(0, vocab, VOCAB_CHUNK):
            block = p[:, v:v + VOCAB_CHUNK].double()
            u += block @ weight[v:v + VOCAB_CHUNK].double()
            p_sum += block.sum(-1)
        return cls(weight=weight, hidden=hidden.float(), p=p, log_p=log_p.float(), u=u, p_sum=p_sum)

    def _shift(self, delta: torch.Tensor) -> torch.Tensor:
        # in the head's own dtype, as the model's logits are; for bf16 heads the small difference loses
        # far less than the model's own bf16 logits do
        return torch.nn.functional.linear(delta.to(self.weight.dtype), self.weight)

    def effects(self, hidden: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-position ``KL(p || q)`` and ``loss_q - loss_p`` (float64, ``(N,)``) of hidden states ``(N, D)``."""
        delta = hidden.float() - self.hidden
        n, vocab = self.p.shape
        excess = torch.empty(n, dtype=torch.float64, device=delta.device)  # A
        d_target = torch.empty(n, dtype=torch.float64, device=delta.device)
        rows = n if delta.device.type != "cpu" else max(32, CHUNK_BYTES // (4 * vocab))
        for r in range(0, n, rows):  # row chunks keep the (rows, V) block in cache on CPU
            sl = slice(r, r + rows)
            d = self._shift(delta[sl]).float()
            d_target[sl] = d.gather(-1, target[sl, None]).squeeze(-1).double()
            if float(d.amax()) < FAST_MAX_D:
                excess[sl] = torch.expm1(d).sub_(d).mul_(self.p[sl]).sum(-1).double()
            else:
                d = d.double()
                excess[sl] = (torch.expm1(d) - d).mul_(self.log_p[sl].double().exp()).sum(-1)
        cross = (self.u * delta.double()).sum(-1) / self.p_sum  # B
        total = (excess / self.p_sum + cross).clamp_min(-1.0)
        log_ratio = torch.log1p(total)
        bad = (total < CANCEL_LIMIT - 1.0) | ~torch.isfinite(total)
        if bool(bad.any()):  # most of p's mass moved away: 1 + A + B cancels, take the log-sum-exp directly
            lp = self.log_p[bad].double()
            log_ratio[bad] = torch.logsumexp(lp + self._shift(delta[bad]).double(), -1) - torch.logsumexp(lp, -1)
        return log_ratio - cross, log_ratio - d_target
