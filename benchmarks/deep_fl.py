"""Federated deep learning benchmark (evaluation.md §B-C): FedHB against baselines on MNIST.

For every alpha and seed the same federation (``hbfl_pyro.deep.partition``), network
initialisation, client schedule and minibatches are used by every method. It writes a
markdown and a JSON table: method x (global acc, personalised acc, new-client acc, NLL,
ECE) as mean +- sd over seeds, the median round time relative to FedAvg (same engine,
network, data and local steps), and the vectorised/loop speed-up of one round at
N = 10, 100, 1,000 clients.

    python benchmarks/deep_fl.py                       # the protocol (slow: 100 clients,
                                                       # 100 rounds, 3 seeds, 2 alphas)
    python benchmarks/deep_fl.py --clients 20 --new-clients 5 --rounds 10 --fraction 0.5 \\
        --seeds 0 --cost-clients 10 100 1000 --out runs/deep_fl_small

Methods (``--methods``) are names with optional ``key=value`` options after a colon:

- ``local``: each client alone, from the initial weights, ``--local-only-epochs`` epochs;
- ``mixture:K=..,warmup=..|cluster=..,hold=..,prox=..,pseudo=..,mixing=uniform|learned`` (FedHB
  mixture with a gate for global prediction; use with ``--rotations``; components start
  from random networks with ``warmup`` rounds of dealt clients, or from ``cluster`` shared
  rounds and a clustering of the clients' updates; ``global_uniform_acc`` is the
  uniform-ensemble fallback, ``cluster_purity`` the share of clients whose component
  holds a majority of their rotation group);
- ``pooled``: one model on all clients' training data, same example budget (upper reference);
- ``fedavg``; ``fedprox:mu=0.01`` (FedProx, per-example ``mu``);
- ``ditto:lam=..`` (Ditto; ``native_personal_acc`` scores its persistent personal models);
- ``perfedavg:variant=fo|hf,alpha=..,adapt_steps=..`` (Per-FedAvg, first-order / Hessian-free);
- ``pfedbayes:rho=..,zeta=..,psteps=..,glr=..`` (pFedBayes-style mean-field Bayesian);
- ``fedhb:family=iso|diag,eps=..,participation=scaled|stale,weighting=size|equal,
  start=global|own,prox=..,pseudo=..,lambda0=..`` (FedHB; hyper-prior: prior prox
  weight ``prox`` per coordinate on the summed-NLL scale, worth ``pseudo`` clients).

Every random choice derives from ``--seeds``. Timing on a shared machine is noisy: the
script reports the median over rounds, both wall-clock and process CPU time.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import statistics
import sys
import time
from pathlib import Path
from typing import Dict, List

import numpy as np
import pyro
import torch

from hbfl_pyro.deep import FedHB, FlatNet, LocalSpec, diag_prior, iso_prior, mlp, partition
from hbfl_pyro.deep.baselines import FedProx, Pooled, local_only
from hbfl_pyro.deep.data import load_images, load_mnist
from hbfl_pyro.deep.local import LEGACY_ENGINES, schedules_for
from hbfl_pyro.deep.metrics import _pooled as pooled_scores
from hbfl_pyro.deep.metrics import evaluate
from hbfl_pyro.deep.mixture import FedHBMixture, evaluate_mixture, mixture_priors
from hbfl_pyro.deep.nets import small_cnn
from hbfl_pyro.deep.personalised import Ditto, PerFedAvg, PFedBayes

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_DATA = ROOT.parent / "shared" / "data" / "mnist_t10k"
DEFAULT_METHODS = [
    "local",
    "pooled",
    "fedavg",
    "fedprox:mu=0.01",
    "fedprox:mu=0.1",
    "fedprox:mu=1",
    "fedhb:family=iso,eps=0.1,participation=scaled,weighting=size",
    "fedhb:family=diag,eps=0.1,participation=scaled,weighting=size",
    "fedhb:family=iso,eps=0.1,participation=stale,weighting=equal",
    "ditto:lam=0.1",
    "ditto:lam=1",
    "perfedavg:variant=fo",
    "perfedavg:variant=hf",
    "pfedbayes:rho=-2,psteps=3",
]
METHOD_NAMES = (
    "local",
    "fedavg",
    "fedprox",
    "fedhb",
    "mixture",
    "ditto",
    "perfedavg",
    "pfedbayes",
    "pooled",
)
METRICS = [
    "global_acc",
    "personal_acc",
    "new_acc",
    "global_nll",
    "global_ece",
    "personal_ece",
    "native_personal_acc",
    "global_uniform_acc",
]


def parse_method(spec: str) -> Dict:
    name, _, opts = spec.partition(":")
    out = {"name": name, "spec": spec}
    for item in filter(None, opts.split(",")):
        key, _, value = item.partition("=")
        out[key] = value
    if name not in METHOD_NAMES:
        raise SystemExit(f"unknown method {name!r} in {spec!r}")
    return out


def make_net(args) -> torch.nn.Module:
    if args.net == "cnn":
        if tuple(args.image_shape[1:]) != (28, 28):
            raise SystemExit(f"--net cnn needs 28x28 images, the data have {args.image_shape}")
        return small_cnn(channels=args.image_shape[0])
    return mlp([int(np.prod(args.image_shape)), *args.hidden, 10])


def load_data(args):
    """``(images, labels)``: MNIST IDX files (``--data``) or scikit-learn's digits."""
    if args.dataset == "digits":
        try:
            from sklearn.datasets import load_digits
        except ImportError as err:  # an optional extra
            raise SystemExit(
                '--dataset digits needs scikit-learn: pip install -e ".[bench]"'
            ) from err
        digits = load_digits()
        # 8x8 images with pixel values 0..16, scaled to [0, 1] like MNIST's.
        return load_images((digits.images / 16.0, digits.target))
    path = Path(args.data)
    return load_mnist(path, args.split) if path.is_dir() else load_images(path)


def build(method: Dict, net, clients, args, seed):
    common = dict(
        fraction=args.fraction,
        local=LocalSpec(
            epochs=args.local_epochs,
            batch_size=args.batch_size,
            lr=args.lr,
            optimizer=args.optimizer,
            momentum=args.momentum,
        ),
        engine=args.engine,
        chunk_size=args.chunk_size,
        seed=seed,
    )
    name = method["name"]
    if name in ("local", "fedavg"):
        return FedProx(net, clients, mu=0.0, **common)
    if name == "fedprox":
        return FedProx(net, clients, mu=float(method.get("mu", 0.01)), **common)
    if name == "ditto":
        return Ditto(
            net,
            clients,
            lam=float(method.get("lam", 0.1)),
            weighting=method.get("weighting", "size"),
            **common,
        )
    if name == "perfedavg":
        steps = method.get("adapt_steps")
        return PerFedAvg(
            net,
            clients,
            alpha=float(method.get("alpha", args.lr)),
            variant=method.get("variant", "fo"),
            adapt_steps=int(steps) if steps else None,
            weighting=method.get("weighting", "equal"),
            **common,
        )
    if name == "pfedbayes":
        return PFedBayes(
            net,
            clients,
            zeta=float(method.get("zeta", 1.0)),
            init_rho=float(method.get("rho", -2.0)),
            global_lr=float(method["glr"]) if "glr" in method else None,
            personal_steps=int(method.get("psteps", 1)),
            beta=float(method.get("beta", 1.0)),
            train_samples=int(method.get("samples", 1)),
            predict_samples=int(method.get("predict", 10)),
            weighting=method.get("weighting", "equal"),
            **common,
        )
    if name == "pooled":
        return Pooled(net, clients, **common)
    if name == "mixture":
        prior = iso_prior if method.get("family", "iso") == "iso" else diag_prior
        families = mixture_priors(
            net,
            int(method.get("K", args.rotations)),
            prior=prior,
            seed=seed,
            prox_weight=float(method.get("prox", 100.0)),
            pseudo_clients=float(method.get("pseudo", 0.01)),
        )
        return FedHBMixture(
            net,
            clients,
            families,
            eps=float(method.get("eps", 0.1)),
            mixing=method.get("mixing", "uniform"),
            # cluster=R: R shared rounds, then components from clustered updates.
            warmup_rounds=0 if "cluster" in method else int(method.get("warmup", 5)),
            cluster_rounds=int(method.get("cluster", 0)),
            hold_rounds=int(method.get("hold", 0)),
            participation=method.get("participation", "stale"),
            weighting=method.get("weighting", "size"),
            **common,
        )
    init = FlatNet(net).vector()
    prior = iso_prior if method.get("family", "iso") == "iso" else diag_prior
    family = prior(
        init,
        prox_weight=float(method.get("prox", 1.0)),
        pseudo_clients=float(method.get("pseudo", 1.0 if prior is iso_prior else 4.0)),
        lambda0=float(method.get("lambda0", 1e-3)),
    )
    return FedHB(
        net,
        clients,
        family,
        eps=float(method.get("eps", 0.1)),
        participation=method.get("participation", "scaled"),
        weighting=method.get("weighting", "size"),
        start=method.get("start", "global"),
        **common,
    )


def cluster_purity(fit: FedHBMixture, split) -> float:
    """Share of training clients in their component's majority rotation group (each client
    counted at the argmax of its latest responsibilities; 1 / K for a single component
    when the K groups are equal in size)."""
    heard = [i for i in range(fit.num_clients) if i in fit.client_resp]
    comp = [int(fit.client_resp[i].argmax()) for i in heard]
    group = [split.clients[i].group for i in heard]
    majority = 0
    for k in set(comp):
        members = [g for c, g in zip(comp, group) if c == k]
        majority += max(members.count(g) for g in set(members))
    return majority / max(len(comp), 1)


def run_one(method: Dict, split, args, seed) -> Dict:
    torch.manual_seed(seed)
    net = make_net(args).to(device=args.device, dtype=args.dtype)
    fit = build(method, net, split.clients, args, seed)
    start = time.perf_counter()
    if method["name"] == "local":
        local = local_only(fit, split.clients, args.local_only_epochs)
        new = local_only(fit, split.new_clients, args.local_only_epochs)
        out = evaluate(fit, split, personal=local, new_personal=new)
        for key in list(out):
            if key.startswith("global") or key == "new_global_acc":
                out[key] = float("nan")  # no global model
        out["round_seconds"] = out["round_cpu"] = float("nan")
    else:
        cpu = []
        for _ in range(args.rounds):
            t0 = time.process_time()
            fit.step()
            cpu.append(time.process_time() - t0)
        if isinstance(fit, FedHBMixture):
            # Global prediction through a gate g(x) over the components, trained by FedAvg
            # for as many rounds as the mixture (the uniform ensemble is also reported).
            gate = mlp([int(np.prod(args.image_shape)), *args.hidden[:1], fit.K])
            fit.train_gate(gate.to(device=args.device, dtype=args.dtype), args.rounds)
            out = evaluate_mixture(fit, split, finetune_epochs=args.finetune_epochs)
        else:
            out = evaluate(fit, split, finetune_epochs=args.finetune_epochs)
        if hasattr(fit, "personal_weights"):
            # Ditto / pFedBayes also keep the persistent personal models their papers score.
            tests = [(c.x_test, c.y_test) for c in split.clients]
            out["native_personal_acc"] = pooled_scores(fit.net, fit.personal_weights(), tests)[
                "acc"
            ]
        # Round 1 carries one-time costs (allocations, first calls): left out when possible.
        skip = 1 if len(cpu) > 2 else 0
        out["round_seconds"] = statistics.median(r["seconds"] for r in fit.history[skip:])
        out["round_cpu"] = statistics.median(cpu[skip:])
        if isinstance(fit, FedHB):
            out["prox_weight"] = fit.prox_weight()
        if isinstance(fit, FedHBMixture):
            out["prox_weight"] = float(np.mean(fit.prox_weights()))
            out["cluster_purity"] = cluster_purity(fit, split)
    out["total_seconds"] = time.perf_counter() - start
    return out


def cost(args, x, y) -> List[Dict]:
    """One round with every client taking part: loop vs vmap, FedAvg vs FedHB.

    Each client holds ``--cost-examples`` images and runs 1 local epoch. The four
    configurations are timed in turns (rep 1 of each, then rep 2, ...) so that load from
    other processes falls on all of them alike; the first turn is an untimed warm-up,
    except for the loop at N >= 1,000, timed once.
    """
    rows = []
    spec = LocalSpec(epochs=1, batch_size=args.batch_size, lr=args.lr)
    configs = [(m, e) for m in ("fedavg", "fedhb") for e in ("loop", "vmap")]
    for n_clients in args.cost_clients:
        k = args.cost_examples
        order = torch.arange(n_clients * k) % len(y)
        clients = [
            (x[order[i * k : (i + 1) * k]], y[order[i * k : (i + 1) * k]]) for i in range(n_clients)
        ]
        torch.manual_seed(0)
        net = make_net(args).to(device=args.device, dtype=args.dtype)
        init = FlatNet(net).vector()
        fits = {}
        for method, engine in configs:
            # The table keeps its short labels: loop = "inprocess", vmap = "vectorised".
            opts = dict(local=spec, engine=LEGACY_ENGINES[engine], chunk_size=args.chunk_size)
            if method == "fedavg":
                fits[method, engine] = FedProx(net, clients, **opts)
            else:
                fits[method, engine] = FedHB(net, clients, iso_prior(init), eps=0.1, **opts)
        sched = schedules_for([k] * n_clients, spec, 0, 1, range(n_clients))
        walls = {c: [] for c in configs}
        cpus = {c: [] for c in configs}
        for rep in range(args.cost_rounds + 1):
            for config in configs:
                long_loop = config[1] == "loop" and n_clients >= 1000
                if long_loop and rep > 1:
                    continue
                fit = fits[config]
                _sync(args.device)
                t0, c0 = time.perf_counter(), time.process_time()
                thetas = fit.train(fit.global_weights(), fit.data, sched, fit.penalty())
                fit.aggregate(list(range(n_clients)), thetas)
                _sync(args.device)
                if rep > 0 or (long_loop and rep == 0 and args.cost_rounds == 0):
                    walls[config].append(time.perf_counter() - t0)
                    cpus[config].append(time.process_time() - c0)
        row = {"clients": n_clients, "examples_per_client": k}
        for (method, engine), values in walls.items():
            row[f"{method}_{engine}_s"] = statistics.median(values)
            row[f"{method}_{engine}_cpu"] = statistics.median(cpus[method, engine])
            print(
                f"  cost N={n_clients} {method} {engine}: wall {row[f'{method}_{engine}_s']:.3f} s",
                flush=True,
            )
        for method in ("fedavg", "fedhb"):
            row[f"{method}_speedup"] = row[f"{method}_loop_s"] / row[f"{method}_vmap_s"]
            row[f"{method}_speedup_cpu"] = row[f"{method}_loop_cpu"] / row[f"{method}_vmap_cpu"]
        row["fedhb_over_fedavg_vmap"] = row["fedhb_vmap_s"] / row["fedavg_vmap_s"]
        row["fedhb_over_fedavg_loop"] = row["fedhb_loop_s"] / row["fedavg_loop_s"]
        row["peak_rss_gb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
        rows.append(row)
    return rows


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def fmt(values: List[float], digits: int = 3) -> str:
    values = [v for v in values if v == v]
    if not values:
        return "n/a"
    if len(values) == 1:
        return f"{values[0]:.{digits}f}"
    return f"{np.mean(values):.{digits}f} ± {np.std(values, ddof=1):.{digits}f}"


def markdown(results: Dict, cost_rows: List[Dict], settings: Dict) -> str:
    lines = [
        "# Federated deep learning benchmark",
        "",
        "```",
        json.dumps(settings, indent=1),
        "```",
    ]
    for alpha, per_method in results.items():
        lines += ["", f"## {settings['scheme']} alpha = {alpha}", ""]
        head = ["method", *METRICS, "round time / FedAvg (wall)", "(cpu)", "prox weight"]
        lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        base = per_method.get("fedavg")
        for spec, runs in per_method.items():
            cells = [spec] + [fmt([r.get(m, float("nan")) for r in runs]) for m in METRICS]
            for key in ("round_seconds", "round_cpu"):
                if base:
                    ratio = [r[key] / b[key] for r, b in zip(runs, base)]
                    cells.append(fmt(ratio, 2))
                else:
                    cells.append("n/a")
            cells.append(fmt([r.get("prox_weight", float("nan")) for r in runs], 2))
            lines.append("| " + " | ".join(cells) + " |")
    if cost_rows:
        lines += ["", "## Cost: one round, every client, 1 local epoch", ""]
        head = [
            "N",
            "FedAvg loop s",
            "FedAvg vmap s",
            "speed-up (wall)",
            "speed-up (cpu)",
            "FedHB loop s",
            "FedHB vmap s",
            "speed-up (wall)",
            "speed-up (cpu)",
            "FedHB/FedAvg loop",
            "FedHB/FedAvg vmap",
            "peak RSS GB",
        ]
        lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for r in cost_rows:
            lines.append(
                f"| {r['clients']} | {r['fedavg_loop_s']:.3f} | {r['fedavg_vmap_s']:.3f} | "
                f"{r['fedavg_speedup']:.2f} | {r['fedavg_speedup_cpu']:.2f} | "
                f"{r['fedhb_loop_s']:.3f} | {r['fedhb_vmap_s']:.3f} | {r['fedhb_speedup']:.2f} | "
                f"{r['fedhb_speedup_cpu']:.2f} | {r['fedhb_over_fedavg_loop']:.2f} | "
                f"{r['fedhb_over_fedavg_vmap']:.2f} | "
                f"{r['peak_rss_gb']:.2f} |"
            )
    return "\n".join(lines) + "\n"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--dataset", default="mnist", choices=["mnist", "digits"])
    p.add_argument("--data", default=str(DEFAULT_DATA), help="IDX directory (zip/gz/plain)")
    p.add_argument("--split", default="t10k", help="IDX file prefix: t10k or train")
    p.add_argument("--clients", type=int, default=100)
    p.add_argument("--new-clients", type=int, default=20)
    p.add_argument("--global-test", type=int, default=2000)
    p.add_argument("--scheme", default="dirichlet", choices=["dirichlet", "shards", "iid"])
    p.add_argument("--dirichlet", default="client", choices=["client", "class"])
    p.add_argument("--alpha", type=float, nargs="+", default=[0.1, 0.5])
    p.add_argument("--rotations", type=int, default=1)
    p.add_argument("--rounds", type=int, default=100)
    p.add_argument("--fraction", type=float, default=0.1)
    p.add_argument("--local-epochs", type=int, default=1)
    p.add_argument("--local-only-epochs", type=int, default=20)
    p.add_argument("--finetune-epochs", type=int, default=5)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=0.05)
    p.add_argument("--optimizer", default="sgd", choices=["sgd", "adam"])
    p.add_argument("--momentum", type=float, default=0.0)
    p.add_argument("--net", default="mlp", choices=["mlp", "cnn"])
    p.add_argument("--hidden", type=int, nargs="*", default=[200, 200])
    p.add_argument(
        "--engine",
        default="vectorised",
        choices=["vectorised", "inprocess", *LEGACY_ENGINES],
        help="the deep trainers' engine (vmap and loop: the former names)",
    )
    p.add_argument(
        "--chunk-size",
        type=int,
        default=32,
        help="clients per vmapped block (0: all at once; small blocks stay in CPU cache)",
    )
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--methods", nargs="*", default=DEFAULT_METHODS, help="none: cost only")
    p.add_argument("--cost-clients", type=int, nargs="*", default=[10, 100, 1000])
    p.add_argument("--cost-examples", type=int, default=64, help="train images per client")
    p.add_argument("--cost-rounds", type=int, default=3, help="timed repetitions (median)")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    p.add_argument("--out", default="runs/deep_fl")
    args = p.parse_args(argv)
    args.dtype = getattr(torch, args.dtype)
    args.engine = LEGACY_ENGINES.get(args.engine, args.engine)
    args.chunk_size = args.chunk_size or None
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.set_default_dtype(args.dtype)
    methods = [parse_method(m) for m in args.methods]
    versions = {
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "pyro": pyro.__version__,
        "numpy": np.__version__,
        "platform": platform.platform(),
        "cpu_threads": torch.get_num_threads(),
        "cuda": torch.cuda.is_available(),
    }
    settings = {k: (str(v) if k == "dtype" else v) for k, v in vars(args).items()}
    settings["versions"] = versions
    print(json.dumps(settings, indent=1), flush=True)
    x, y = load_data(args)
    args.image_shape = tuple(x.shape[1:])
    results: Dict[str, Dict[str, List[Dict]]] = {}
    alphas = args.alpha if args.scheme == "dirichlet" else [None]
    for alpha in alphas if methods else []:
        key = str(alpha)
        results[key] = {m["spec"]: [] for m in methods}
        for seed in args.seeds:
            split = partition(
                x,
                y,
                scheme=args.scheme,
                num_clients=args.clients,
                num_new_clients=args.new_clients,
                alpha=alpha or 0.5,
                dirichlet=args.dirichlet,
                rotations=args.rotations,
                global_test=args.global_test,
                seed=seed,
            )
            for method in methods:
                out = run_one(method, split, args, seed)
                results[key][method["spec"]].append(out)
                shown = {k: round(v, 4) for k, v in out.items() if isinstance(v, float)}
                print(f"alpha={alpha} seed={seed} {method['spec']}: {shown}", flush=True)
    cost_rows = cost(args, x, y) if args.cost_clients else []
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    table = markdown(results, cost_rows, settings)
    (out_dir / "results.md").write_text(table)
    (out_dir / "results.json").write_text(
        json.dumps({"settings": settings, "results": results, "cost": cost_rows}, indent=1)
    )
    print(table)
    print(f"wrote {out_dir / 'results.md'} and {out_dir / 'results.json'}")


if __name__ == "__main__":
    main()
