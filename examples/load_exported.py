"""Export a pruned model and load it back as any user would, then check it against masking.

Removes the ``--fraction`` most inactive heads by ``ahon_ln`` (no accuracy budget: use
``prune-heads select`` or ``prune-heads run`` for that), exports the ``sliced`` format, reloads it with
``AutoModelForCausalLM`` and generates.

    python examples/load_exported.py --num-samples 4 --seq-len 32 -o /tmp/smollm2-pruned
"""

from __future__ import annotations

import argparse
import tempfile

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import prune_heads
from prune_heads.export import export_checkpoint as export
from prune_heads.scoring.calibrate import calibrate
from prune_heads.scoring.score_defs import inactivity


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--fraction", type=float, default=0.05)
    ap.add_argument("--num-samples", type=int, default=16)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--format", default="sliced", choices=["sliced", "masked"])
    ap.add_argument("-o", "--output", default=None, help="export directory (default: a temporary one)")
    args = ap.parse_args(argv)

    loaded = prune_heads.load_model(args.model)
    model, tok = loaded.model, loaded.tokenizer
    scores = calibrate(model, "wikitext2", tokenizer=tok, scores=["ahon_ln"],
                                   num_samples=args.num_samples, seq_len=args.seq_len, batch_size=4)
    k = max(1, int(args.fraction * scores.num_layers * scores.num_heads))
    order = inactivity(scores.mean("ahon_ln"), "ahon_ln").flatten().argsort(descending=True)[:k]
    plan = prune_heads.Plan([divmod(int(i), scores.num_heads) for i in order])
    plan.validate(model)

    out = args.output or tempfile.mkdtemp(prefix="pruned-") + "/model"
    result = export(args.model, plan, out, format=args.format, overwrite=True, verify=False, progress=False)
    print(f"removed {k} heads: {result.params_before:,} -> {result.params_after:,} parameters in {out}")

    # `import prune_heads` registered the pruned model types; trust_remote_code=True works without it
    pruned = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True).eval()
    tokenizer = AutoTokenizer.from_pretrained(out)
    ids = tokenizer("The capital of France is", return_tensors="pt").input_ids
    with torch.no_grad(), prune_heads.static_mask(model, plan):
        expected = model(input_ids=ids).logits
    with torch.no_grad():
        got = pruned(input_ids=ids).logits
    print(f"max |logit difference| vs the masked original: {(got - expected).abs().max():.2e}")
    text = tokenizer.decode(pruned.generate(ids, max_new_tokens=8, do_sample=False)[0])
    print(f"generate: {text!r}")


if __name__ == "__main__":
    main()
