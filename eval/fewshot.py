"""Few-shot linear evaluation of frozen ViT features (the ViT paper's protocol, arXiv 2010.11929).

k images per class are embedded (the final-norm class token, "pre_logits"), and a regularised
least-squares classifier to {-1,+1} one-hot targets is solved in closed form, as big_vision's
`fewshot_lsr.py`. Usage: `python eval/fewshot.py --run runs/mpp` (add `--random-init` for the
untrained baseline of the same architecture).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Subset
from tqdm.auto import tqdm

from mpp.checkpoint import KernelsFor, load_checkpoint, load_run
from mpp.config import (
    AT_LEAST_1,
    NON_NEGATIVE,
    POSITIVE,
    SEED,
    Parser,
    Range,
    device_flag,
    number_flag,
)
from mpp.data import DEFAULT_DATASET, build_dataset, dataset_name, normalize
from mpp.errors import UsageError, cli_main
from mpp.files import write_json
from mpp.kernels import MODES, KernelPolicy, RunShapes
from mpp.model import ViT, ViTConfig, vit_config
from mpp.rundir import CKPT_RE
from mpp.runtime import choose_kernels, compile_blocks

BIAS = 100.0  # the constant feature: large, so the bias weight is (almost) not regularised
STD_KIND = "population (ddof=0) over seeds"


def _f64(x) -> np.ndarray:  # torch or numpy -> float64 numpy
    return np.asarray(x.detach().cpu().numpy() if torch.is_tensor(x) else x, dtype=np.float64)


def _labels(y) -> np.ndarray:  # torch or numpy -> int64 numpy [n]
    return np.asarray(y.detach().cpu().numpy() if torch.is_tensor(y) else y).astype(np.int64).reshape(-1)


def lsr_predict(train_x, train_y, test_x, l2s, num_classes: int | None = None) -> dict[float, np.ndarray]:
    """Predicted test classes for each l2, from ONE eigendecomposition (the only copy of the math)."""
    x, xt, y = _f64(train_x), _f64(test_x), _labels(train_y)  # (n, d), (m, d), (n,)
    if x.ndim != 2 or xt.ndim != 2 or x.shape[1] != xt.shape[1] or len(x) != len(y) or not len(x):
        raise UsageError(f"few-shot probe got train features {x.shape}, labels {y.shape}, test features {xt.shape}: "
                         "pass non-empty [n, d] features with one label each and the same d for train and test")
    mean, std = x.mean(0), x.std(0) + 1e-5  # train statistics only: the test set never shapes the probe
    x = np.concatenate([(x - mean) / std, np.full((len(x), 1), BIAS)], 1)  # (n, d+1)
    xt = np.concatenate([(xt - mean) / std, np.full((len(xt), 1), BIAS)], 1)  # (m, d+1)
    k = int(num_classes or y.max() + 1)
    targets = 2.0 * np.eye(k)[y] - 1.0  # (n, K) one-hot in {-1, +1}
    # w = (XᵀX + l2·I)⁻¹ Xᵀy = Xᵀ(XXᵀ + l2·I)⁻¹ y; decompose the smaller Gram matrix once and
    # every l2 is then a diagonal rescaling.
    if len(x) >= x.shape[1]:
        eigs, q = np.linalg.eigh(x.T @ x)  # (d+1,), (d+1, d+1)
        rhs, lhs = q.T @ (x.T @ targets), q  # (d+1, K), (d+1, d+1)
    else:
        eigs, q = np.linalg.eigh(x @ x.T)  # (n,), (n, n)
        rhs, lhs = q.T @ targets, x.T @ q  # (n, K), (d+1, n)
    out = {}
    for l2 in l2s:
        w = (lhs * (1.0 / (eigs + l2))) @ rhs  # (d+1, K)
        out[float(l2)] = (xt @ w).argmax(1)  # (m,)
    return out


def fewshot_probe_grid(train_x, train_y, test_x, test_y, l2s, num_classes: int | None = None) -> dict[float, float]:
    """Test accuracy in [0, 1] for every l2 in `l2s`."""
    y_test = _labels(test_y)
    k = num_classes or int(max(_labels(train_y).max(), y_test.max(initial=0))) + 1
    preds = lsr_predict(train_x, train_y, test_x, l2s, num_classes=k)
    return {l2: float((p == y_test).mean()) for l2, p in preds.items()}


def fewshot_probe(train_x, train_y, test_x, test_y, l2: float = 2**10, num_classes: int | None = None) -> float:
    """Test accuracy in [0, 1] of the closed-form least-squares probe fit on (train_x, train_y)."""
    return fewshot_probe_grid(train_x, train_y, test_x, test_y, [l2], num_classes)[float(l2)]


def sample_shots(labels, shots: int, seed: int, num_classes: int | None = None, class_names=None) -> np.ndarray:
    """Indices of `shots` examples of every class, drawn without replacement (deterministic per seed)."""
    labels = _labels(labels)
    rng = np.random.default_rng(seed)
    classes = range(num_classes) if num_classes else np.unique(labels)
    picked = []
    for c in classes:
        pool = np.flatnonzero(labels == c)
        if len(pool) < shots:
            name = f" ('{class_names[c]}')" if class_names is not None else ""
            raise UsageError(f"class {c}{name} has {len(pool)} training examples, fewer than {shots} shots: "
                             "pass smaller --shots or a dataset with more examples per class")
        picked.append(rng.choice(pool, size=shots, replace=False))
    return np.concatenate(picked).astype(np.int64)


FEATURES = ("token", "avg")  # the paper's class-token pre-logits | the mean of the final-norm patch tokens


def pool(outputs: dict[str, torch.Tensor], features: str) -> torch.Tensor:
    """(B, D) features from `ViT.forward_features` outputs: the class token (the paper's
    representation) or the average patch token (MPP trains the patch tokens, not the class token)."""
    if features == "token":
        return outputs["pre_logits"]  # (B, D)
    if features == "avg":
        return outputs["tokens"][:, 1:].mean(1)  # (B, N, D) -> (B, D)
    raise UsageError(f"unknown --features '{features}': use {' or '.join(FEATURES)}")


@torch.no_grad()
def process_group():
    """accelerate's process state when started as several processes (`accelerate launch`), else None."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return None
    from accelerate import PartialState

    return PartialState(cpu=not torch.cuda.is_available())  # gloo on a machine without CUDA


def process_device(device, state) -> torch.device:
    """`--device`, or under `accelerate launch` with CUDA this process's own GPU (one GPU per process)."""
    return state.device if state is not None and str(device).startswith("cuda") else torch.device(device)


def is_main_process() -> bool:
    return (state := process_group()) is None or state.is_main_process


@torch.no_grad()
def extract_features(vit, dataset, batch_size: int = 256, device="cpu", indices=None, num_workers: int = 0,
                     progress: bool = True, desc: str = "features",
                     features: str = "token") -> tuple[torch.Tensor, torch.Tensor]:
    """(features float32 [n, D], labels long [n]) of `dataset` (or of its `indices` only), in order.

    Under `accelerate launch` each process embeds a contiguous share and every process gets all
    the features back, in dataset order: no image is embedded twice or dropped."""
    order = list(range(len(dataset))) if indices is None else [int(i) for i in indices]
    state = process_group()
    device = process_device(device, state)
    if state is not None:
        order = [int(i) for i in np.array_split(np.asarray(order, dtype=np.int64), state.num_processes)[state.process_index]]
        progress = progress and state.is_main_process
    loader = DataLoader(Subset(dataset, order), batch_size=batch_size, shuffle=False, num_workers=num_workers)
    was_training = vit.training
    vit.eval().to(device)
    feats, labels = [], []
    for images, y in tqdm(loader, desc=desc, leave=False, disable=not progress):
        out = pool(vit.forward_features(normalize(images.to(device))), features)  # (B, D)
        feats.append(out.float().cpu())
        labels.append(torch.as_tensor(y).reshape(-1))
    vit.train(was_training)
    if state is not None:  # [(features, labels) of process 0, of process 1, ...]: contiguous shares in order
        from accelerate.utils import gather_object

        shares = gather_object([(feats, labels)])
        feats = [f for share, _ in shares for f in share]
        labels = [y for _, share in shares for y in share]
    if not feats:
        raise UsageError("few-shot evaluation got an empty dataset: pass a dataset with images in both splits")
    return torch.cat(feats), torch.cat(labels).long()  # (n, D), (n,)


def dataset_labels(dataset) -> np.ndarray:
    """All labels, read without decoding any image where the dataset allows it."""
    if hasattr(dataset, "table") and hasattr(dataset, "label_column"):  # mpp.data.HubImages: one column read
        return _labels(dataset.table[dataset.label_column])
    for attr in ("labels", "targets"):  # mpp.data.TensorImages, torchvision datasets
        if isinstance(getattr(dataset, attr, None), (list, tuple, np.ndarray, torch.Tensor)):
            return _labels(getattr(dataset, attr))
    return _labels([int(dataset[i][1]) for i in range(len(dataset))])  # fallback: decodes every image


def run_fewshot(vit, dataset_spec: str, image_size: int, shots=(1, 5, 10, 25), seeds: int = 3, l2s=(2**10,),
                batch_size: int = 256, device="cpu", max_test: int = 0, num_workers: int = 0,
                progress: bool = True, features: str = "token") -> dict:
    """Few-shot accuracies of `vit`'s features for every shot count, over seeds 0..seeds-1."""
    shots, l2s = list(dict.fromkeys(int(k) for k in shots)), list(dict.fromkeys(float(v) for v in l2s))  # dedupe
    train_set, info = build_dataset(dataset_spec, "train", image_size, train=False)
    test_set, _ = build_dataset(dataset_spec, "test", image_size, train=False)
    train_labels = dataset_labels(train_set)
    picks = {(k, s): sample_shots(train_labels, k, s, info.num_classes, info.class_names)
             for k in shots for s in range(seeds)}
    # Embed each sampled training image once (the union over all cells), not the whole split.
    union = np.unique(np.concatenate(list(picks.values())))
    train_x, train_y = extract_features(vit, train_set, batch_size, device, union, num_workers, progress, "train",
                                        features)
    test_idx = None
    if 0 < max_test < len(test_set):  # a fixed random subset, sorted to read the split in order
        test_idx = np.sort(np.random.default_rng(0).permutation(len(test_set))[:max_test])
    test_x, test_y = extract_features(vit, test_set, batch_size, device, test_idx, num_workers, progress, "test",
                                      features)

    results = {}
    for k in shots:
        per_seed = []  # one {l2: accuracy} per seed
        for s in range(seeds):
            rows = np.searchsorted(union, picks[k, s])
            per_seed.append(fewshot_probe_grid(train_x[rows], train_y[rows], test_x, test_y, l2s, info.num_classes))
        grid = {f"{l2:.12g}": [acc[l2] for acc in per_seed] for l2 in l2s}  # JSON keys: "1024", "0.1"
        head = grid[f"{l2s[0]:.12g}"]  # the headline is fixed in advance: picking the best l2 would use the test set
        results[str(k)] = {"shots": k, "mean": float(np.mean(head)), "std": float(np.std(head)), "per_seed": head,
                           "l2_grid": {key: {"mean": float(np.mean(v)), "std": float(np.std(v)), "per_seed": v}
                                       for key, v in grid.items()}}
    return {"dataset": {"spec": dataset_spec, "image_size": image_size, "num_classes": info.num_classes,
                        "train_size": len(train_set), "test_size": len(test_set), "test_used": len(test_x),
                        "train_embedded": len(union)},
            "shots": list(shots), "seeds": list(range(seeds)), "l2_grid": l2s, "headline_l2": l2s[0],
            "std": STD_KIND, "feature_dim": int(train_x.shape[1]), "results": results}


def checkpoint_step(path: Path) -> int:
    if match := CKPT_RE.search(Path(path).name):  # ckpt-<step>.pt: no second load needed
        return int(match.group(1))
    try:  # weights-only like every load; mmap: reads the small "step" entry, not the tensors
        return int(load_checkpoint(path, mmap=True).get("step", 0))
    except (UsageError, TypeError, ValueError):  # unreadable, or a step that is no number
        return 0


def probe_kernels(args) -> KernelsFor:
    """The kernels of a probe's ViT, decided once at its shapes: forward only, fp32, --batch-size images."""
    policy = KernelPolicy.from_flags(args.kernels, args.kernel_cache)
    state = process_group()

    def kernels_for(vit_config: ViTConfig):
        shapes = RunShapes.of(vit_config, args.batch_size, "float32", backward=False)
        return choose_kernels(policy, shapes, process_device(args.device, state), state).kernels

    return kernels_for


def build_model(args) -> tuple[dict | None, torch.nn.Module, Path | None, Path | None]:
    """(run config or None, ViT, run dir or None, checkpoint path or None) from the flags."""
    kernels_for = probe_kernels(args)
    if args.model:  # a preset: the random-init baseline without any run
        if not args.random_init or args.run:
            raise UsageError("--model builds an untrained preset: add --random-init and drop --run "
                             "(a trained model comes from --run alone)")
        torch.manual_seed(args.seed or 0)
        vit_cfg = vit_config(args.model, image_size=args.image_size)
        return None, ViT(vit_cfg, kernels_for(vit_cfg)), None, None
    run = Path(args.run or "runs/mpp")
    size = {"image_size": args.image_size} if args.image_size else {}
    if not args.random_init:
        config, vit, path = load_run(run, kernels_for, **size)
        return config, vit, run_dir_of(run), path
    if run.is_dir() and (run / "config.json").is_file():  # a run that has not saved a checkpoint yet
        config = json.loads((run / "config.json").read_text())
    else:
        config = load_run(run)[0]  # the run's errors for a missing dir or a run without checkpoints
    torch.manual_seed(config["train"]["seed"] if args.seed is None else args.seed)
    vit_cfg = ViTConfig(**{**config["vit"], **size})
    return config, ViT(vit_cfg, kernels_for(vit_cfg)), run_dir_of(run), None


def run_dir_of(run: Path) -> Path:
    """The run directory of `--run`, which may name a checkpoint file (RUN/checkpoints/ckpt-N.pt)."""
    if run.is_dir():
        return run
    return run.parent.parent if run.parent.name == "checkpoints" else run.parent


def add_model_flags(p: argparse.ArgumentParser) -> None:
    """The flags that pick the model and the data (shared with eval/linear_probe.py)."""
    p.add_argument("--run", metavar="RUN_DIR", help="run directory or checkpoint file (default: runs/mpp)")
    p.add_argument("--random-init", action="store_true", help="evaluate an untrained ViT of the run's architecture")
    p.add_argument("--model", metavar="PRESET", help="with --random-init and no --run: an untrained preset (Micro/4)")
    number_flag(p, "--seed", int, SEED, help="initialisation seed of --random-init (default: the run's seed, or 0)")
    p.add_argument("--dataset", metavar="SPEC", help="dataset spec (default: the run's training dataset)")
    number_flag(p, "--image-size", int, AT_LEAST_1, metavar="S", help="input pixels (default: the run's or the preset's)")


def add_runtime_flags(p: argparse.ArgumentParser) -> None:
    """The flags that say how features are computed (shared with eval/linear_probe.py)."""
    number_flag(p, "--batch-size", int, AT_LEAST_1, default=256, help="images per forward pass (256)")
    number_flag(p, "--num-workers", int, Range(0, 256), default=0, help="DataLoader worker processes (0)")
    p.add_argument("--device", type=device_flag, default="cuda" if torch.cuda.is_available() else "cpu",
                   help="cpu, cuda or cuda:N (default: cuda if there is one)")
    p.add_argument("--kernels", default="", choices=MODES,
                   help="attention/LayerNorm: auto (ours where verified and faster) | triton | torch ($MPP_KERNELS or auto)")
    p.add_argument("--kernel-cache", default="", metavar="DIR", help="the kernels' verdict cache; off: measure again "
                   "($MPP_KERNEL_CACHE or ~/.cache/mpp/kernels)")
    p.add_argument("--compile", action="store_true", help="torch.compile the ViT's blocks")
    p.add_argument("--features", default="token", choices=FEATURES, help="token: the class token's pre-logits (the "
                   "paper's); avg: the mean patch token (default files get an -avg suffix)")


def check_flags(args: argparse.Namespace) -> None:
    """The checks that span flags (each flag's own range is checked as it is parsed)."""
    if args.model and not args.output:
        raise UsageError("--model has no run directory to write to: pass --output PATH for the results JSON")


def build_parser() -> Parser:
    p = Parser(description=__doc__.split("\n\n")[0])
    add_model_flags(p)
    number_flag(p, "--shots", int, AT_LEAST_1, nargs="+", default=[1, 5, 10, 25], help="examples per class (1 5 10 25)")
    number_flag(p, "--seeds", int, Range(1, 1000), default=3, help="few-shot draws per shot count, seeds 0..N-1 (3)")
    number_flag(p, "--l2", float, POSITIVE, nargs="+", default=[2.0**10], help="ridge penalties, the first is the "
                "headline (1024); the others are only reported: choosing by test accuracy would leak the test set")
    number_flag(p, "--max-test", int, NON_NEGATIVE, default=0, metavar="N",
                help="test on a fixed random N images; 0 = all (0)")
    add_runtime_flags(p)
    p.add_argument("--output", metavar="PATH", help="results JSON (default: RUN_DIR/fewshot[-random-init].json)")
    return p


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    args = build_parser().parse_args(argv)
    check_flags(args)
    return args


@dataclasses.dataclass
class ProbeTarget:
    """What a probe CLI evaluates, from its flags: the model, where it came from, where results go."""
    config: dict | None  # the run's config (None for a bare --model preset)
    vit: torch.nn.Module
    run_dir: Path | None
    checkpoint: Path | None
    dataset: str  # --dataset, else the run's training dataset
    prefix: str  # e.g. "fewshot" or "fewshot_random_init": TensorBoard tag and default file name
    step: int  # the checkpoint's step (0 for a random init)

    def report_head(self, args) -> dict:
        return {"init": "random" if args.random_init else "trained", "run": str(self.run_dir) if self.run_dir else None,
                "checkpoint": str(self.checkpoint) if self.checkpoint else None, "step": self.step,
                "features": args.features, "kernels": self.vit.kernels.names()}  # which ops computed the features

    def output(self, args) -> Path:  # RUN_DIR/<prefix with dashes>.json unless --output
        return Path(args.output) if args.output else self.run_dir / f"{self.prefix.replace('_', '-')}.json"


def probe_target(args, name: str) -> ProbeTarget:
    """The model and settings a probe CLI (`name`: fewshot, linear_probe) evaluates."""
    config, vit, run_dir, ckpt_path = build_model(args)
    if args.compile:
        compile_blocks(vit)
    dataset = args.dataset or (config or {}).get("train", {}).get("dataset", DEFAULT_DATASET)
    prefix = f"{name}_random_init" if args.random_init else name
    prefix += "_avg" if args.features == "avg" else ""
    return ProbeTarget(config, vit, run_dir, ckpt_path, dataset, prefix, checkpoint_step(ckpt_path) if ckpt_path else 0)


def save_report(target: ProbeTarget, output: Path, report: dict, scalars: dict[str, float], folder: str) -> None:
    """Write the JSON report, and its headline scalars to TensorBoard beside the run's own curves,
    at the checkpoint's step so probes of successive checkpoints line up."""
    try:
        output.parent.mkdir(parents=True, exist_ok=True)
        write_json(output, report)
    except OSError as e:
        raise UsageError(f"cannot write '{output}' ({e.strerror}): pass a writable --output") from e
    from torch.utils.tensorboard import SummaryWriter

    with SummaryWriter(str((target.run_dir or output.parent) / "tensorboard" / folder)) as tb:
        for tag, value in scalars.items():
            tb.add_scalar(tag, value, global_step=target.step)
    print(f"wrote {output}")


@cli_main
def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    target = probe_target(args, "fewshot")
    vit, dataset, prefix = target.vit, target.dataset, target.prefix
    image_size = vit.config.image_size
    out = run_fewshot(vit, dataset, image_size, tuple(args.shots), args.seeds, tuple(args.l2), args.batch_size,
                      args.device, args.max_test, args.num_workers, features=args.features)

    if not is_main_process():  # every process helped embed; one reports
        return {}
    print(f"{prefix}: {dataset} at {image_size} px, {out['feature_dim']}-d features, "
          f"l2={args.l2[0]:g}, {args.seeds} seed(s)")
    print(f"{'shots':>5} | {'accuracy (%)':>15} | per seed")
    for k, r in out["results"].items():
        seeds = " ".join(f"{100 * a:.1f}" for a in r["per_seed"])
        print(f"{k:>5} | {100 * r['mean']:6.2f} ± {100 * r['std']:5.2f} | {seeds}")

    train_cfg = (target.config or {}).get("train", {})
    report = {**target.report_head(args),
              "run_config": {k: train_cfg.get(k) for k in ("objective", "model", "dataset", "image_size", "seed")}
              if target.config else None,
              "model": args.model, "vit": dataclasses.asdict(vit.config), **out}
    scalars = {f"{prefix}/{dataset_name(dataset)}/{k}shot": r["mean"] for k, r in out["results"].items()}
    save_report(target, target.output(args), report, scalars, "fewshot")
    return report


if __name__ == "__main__":
    main()
