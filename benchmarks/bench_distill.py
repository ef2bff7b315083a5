"""Distillation against self-supervision for a small student on Fashion-MNIST, at the same number of steps.

1. A teacher, a wider small ResNet, is pretrained with wrapssl (SimCLR, the app's settings), or read
   from --teacher (a backbone.pt of an earlier run of this script).
2. The student (the app's default small ResNet) trains for --steps steps twice from the same initial
   weights: with SimCLR (the app's method and settings, the best of wrapssl's methods in short CPU
   runs) and with method="distill" from the teacher. Wall time of each is measured.
3. Every net is scored on the report's protocol: kNN (k=200, t=0.1, all 60,000 training images as
   memory, the 10,000 test images as queries) and a linear probe, beside raw pixels and the
   student's random init.

    nice python benchmarks/bench_distill.py --teacher-steps 500 --steps 250 --json distill.json
"""
from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402
from torch.optim.lr_scheduler import LambdaLR  # noqa: E402

from common import command, machine, save_json  # noqa: E402
from wrapssl import Learner  # noqa: E402
from wrapssl.archs import SmallResNet  # noqa: E402
from wrapssl.data import load_dataset  # noqa: E402
from wrapssl.evaluate import baseline_scores, embed_dataset, format_scores, probe_scores  # noqa: E402
from wrapssl.encoder import ClassifierInput  # noqa: E402
from wrapssl.optim import WarmupCosine, build_optimizer  # noqa: E402

SIZE, CROP = 28, (0.25, 1.0)  # the app's Fashion-MNIST settings
PRE_LOGITS = ClassifierInput("fc")  # SmallResNet's representation: the input of its classifier


def pretrain(net: torch.nn.Module, images: torch.Tensor, method: str, steps: int, batch: int, lr: float,
             seed: int, **method_kwargs) -> float:
    """``steps`` AdamW steps of ``method`` on random batches, as the app runs them (lr·batch/256, 10% warmup,
    cosine); returns the wall time in seconds."""
    learner = Learner(net, SIZE, method=method, crop_scale=CROP, total_steps=steps, **method_kwargs)
    opt = build_optimizer("adamw", learner, lr * batch / 256)
    schedule = LambdaLR(opt, WarmupCosine(steps, steps // 10))
    g = torch.Generator().manual_seed(seed)
    start = time.perf_counter()
    for step in range(steps):
        loss = learner(images[torch.randint(0, len(images), (batch,), generator=g)])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        schedule.step()
        learner.update_moving_average()
        if step % 50 == 0 or step == steps - 1:
            print(f"  {method} step {step}: loss {loss.item():.4f} ({time.perf_counter() - start:.0f} s)", flush=True)
    seconds = time.perf_counter() - start
    learner.close()
    return seconds


def scores(net: torch.nn.Module, memory, queries) -> dict[str, float]:
    """kNN and linear probe of the net's pre-logits on the report's protocol."""
    net.eval()
    return probe_scores(embed_dataset(net, memory, 512, hidden_layer=PRE_LOGITS),
                        embed_dataset(net, queries, 512, hidden_layer=PRE_LOGITS))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=250, help="student steps, the same for both students")
    p.add_argument("--teacher-steps", type=int, default=500)
    p.add_argument("--teacher-widths", type=int, nargs=4, default=(32, 64, 128, 256))
    p.add_argument("--teacher", default=None, help="a teacher backbone.pt from an earlier run (skips step 1)")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--lr", type=float, default=2e-3, help="at batch 256 (the app's default)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="runs/bench-distill", help="where the teacher's backbone.pt is written")
    p.add_argument("--json", default=None)
    args = p.parse_args()
    print(machine())
    train = load_dataset("fashion-mnist", SIZE, split="train")
    test = load_dataset("fashion-mnist", SIZE, split="test")
    images = train.images
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    torch.manual_seed(args.seed)
    teacher = SmallResNet(1, widths=args.teacher_widths)
    teacher_seconds = None
    if args.teacher:
        teacher.load_state_dict(torch.load(args.teacher, map_location="cpu", weights_only=True))
    else:
        print(f"teacher {args.teacher_widths}: SimCLR, {args.teacher_steps} steps")
        teacher_seconds = pretrain(teacher, images, "simclr", args.teacher_steps, args.batch_size, args.lr,
                                   args.seed, temperature=0.2)
        torch.save(teacher.state_dict(), out / "backbone.pt")

    torch.manual_seed(args.seed + 1)
    init = SmallResNet(1).state_dict()
    students, seconds = {}, {}
    for name, kwargs in [("simclr", dict(temperature=0.2)),
                         ("distill", dict(teacher=teacher, teacher_layer=PRE_LOGITS))]:
        net = SmallResNet(1)
        net.load_state_dict(init)
        print(f"student: {name}, {args.steps} steps")
        seconds[name] = pretrain(net, images, name, args.steps, args.batch_size, args.lr, args.seed, **kwargs)
        students[name] = net

    random_init = SmallResNet(1)
    random_init.load_state_dict(init)
    rows = baseline_scores(train, test, SIZE, random_init.eval(), hidden_layer=PRE_LOGITS)
    rows["student, simclr"] = scores(students["simclr"], train, test)
    rows["student, distill"] = scores(students["distill"], train, test)
    rows["teacher"] = scores(teacher, train, test)
    params = {"student": sum(t.numel() for t in random_init.parameters()),
              "teacher": sum(t.numel() for t in teacher.parameters())}
    print(format_scores(rows, memory=len(train)))
    print(json.dumps({"seconds": seconds, "teacher_seconds": teacher_seconds, "params": params}))
    save_json(args.json, {"command": command(), "machine": machine(), "steps": args.steps,
                          "teacher_steps": args.teacher_steps, "batch_size": args.batch_size, "seconds": seconds,
                          "teacher_seconds": teacher_seconds, "params": params, "scores": rows})


if __name__ == "__main__":
    main()
