"""The PyTorch peer of bench/train_bench.py: a nanoGPT-style train step of the same shape.

A minimal pre-LayerNorm decoder as models/transformer.py builds it (learned
positions, causal SDPA attention, tanh-GELU MLP of 4 d_model, an output head
tied to the token embedding), AdamW with weight decay on matrices only and
global-norm clipping at 1.0, on a fixed batch of random tokens. It prints one
JSON object: the median seconds per step and tokens per second. With --serve
it builds the model once and times one round for every line it reads
(train_bench.py's --pair rounds).

    python bench/torch_peer.py --n-layer 4 --d-model 96 --n-heads 6 --n-ctx 128 --batch 16

It needs PyTorch (`pip install -e '.[bench]'`, or any interpreter that has it:
train_bench.py --torch-python PATH); the tests never import it.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time


def _model(torch, n_layer: int, d_model: int, n_heads: int, n_ctx: int, vocab: int):
    nn, F = torch.nn, torch.nn.functional

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.ln_attn, self.ln_mlp = nn.LayerNorm(d_model), nn.LayerNorm(d_model)
            self.qkv = nn.Linear(d_model, 3 * d_model)
            self.attn_out = nn.Linear(d_model, d_model)
            self.mlp_in = nn.Linear(d_model, 4 * d_model)
            self.mlp_out = nn.Linear(4 * d_model, d_model)

        def forward(self, x_BxLxD):
            b, length, d = x_BxLxD.shape
            qkv = self.qkv(self.ln_attn(x_BxLxD)).view(b, length, 3, n_heads, d // n_heads)
            q, k, v = qkv.permute(2, 0, 3, 1, 4)  # each [B, N, L, H]
            attn = F.scaled_dot_product_attention(q, k, v, is_causal=True)
            x_BxLxD = x_BxLxD + self.attn_out(attn.transpose(1, 2).reshape(b, length, d))
            return x_BxLxD + self.mlp_out(
                F.gelu(self.mlp_in(self.ln_mlp(x_BxLxD)), approximate="tanh")
            )

    class Decoder(nn.Module):
        def __init__(self):
            super().__init__()
            self.token_embed = nn.Embedding(vocab, d_model)
            self.pos_embed = nn.Parameter(torch.randn(n_ctx, d_model) * 0.01)
            self.blocks = nn.ModuleList(Block() for _ in range(n_layer))
            self.ln_final = nn.LayerNorm(d_model)

        def forward(self, tokens_BxL):
            x = self.token_embed(tokens_BxL) + self.pos_embed[: tokens_BxL.shape[1]]
            for block in self.blocks:
                x = block(x)
            return self.ln_final(x) @ self.token_embed.weight.T  # tied head

    return Decoder()


def step_timer(
    n_layer: int,
    d_model: int,
    n_heads: int,
    n_ctx: int,
    batch: int,
    vocab: int = 256,
    threads: int = 0,
):
    """The model built and warmed up once; returns repeats -> median seconds a step.

    Each call goes on training the same model, as a loop would.
    """
    import torch

    if threads:
        torch.set_num_threads(threads)
    torch.manual_seed(0)
    model = _model(torch, n_layer, d_model, n_heads, n_ctx, vocab)
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
        lr=1e-3,
        betas=(0.9, 0.95),
    )
    tokens = torch.randint(1, vocab, (batch, n_ctx + 1))

    def step():
        logits = model(tokens[:, :-1])
        loss = torch.nn.functional.cross_entropy(
            logits.reshape(-1, vocab), tokens[:, 1:].reshape(-1)
        )
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()

    for _ in range(3):
        step()

    def median_step_seconds(repeats: int) -> float:
        per_block, times = 8, []
        for _ in range(repeats):
            start = time.perf_counter()
            for _ in range(per_block):
                step()
            times.append((time.perf_counter() - start) / per_block)
        return statistics.median(times)

    return median_step_seconds


def _result(step_s: float, batch: int, n_ctx: int) -> dict:
    import torch

    return {
        "step_s": step_s,
        "tokens_per_s": batch * n_ctx / step_s,
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
    }


def serve(timer, args) -> None:
    """--serve: print {"ready": true}, then time one round per line read.

    train_bench.py runs two of these (and two of its own workers) side by
    side and asks them for rounds in turn, so ours and PyTorch's pairs are
    measured alternately without recompiling or rebuilding.
    """
    print(json.dumps({"ready": True}), flush=True)
    for _ in sys.stdin:
        print(json.dumps(_result(timer(args.repeats), args.batch, args.n_ctx)), flush=True)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    for name in ("n-layer", "d-model", "n-heads", "n-ctx", "batch"):
        parser.add_argument(f"--{name}", type=int, required=True)
    parser.add_argument("--vocab", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=0, help="torch threads; 0 = its default")
    parser.add_argument("--cpu", type=int, default=-1, help="pin the process to this core")
    parser.add_argument(
        "--serve", action="store_true", help="time one round per line of stdin (see `serve`)"
    )
    args = parser.parse_args(argv)
    if args.cpu >= 0:
        os.sched_setaffinity(0, {args.cpu})
    timer = step_timer(
        args.n_layer, args.d_model, args.n_heads, args.n_ctx, args.batch, args.vocab, args.threads
    )
    if args.serve:
        return serve(timer, args)
    print(json.dumps(_result(timer(args.repeats), args.batch, args.n_ctx)))


if __name__ == "__main__":
    main()
