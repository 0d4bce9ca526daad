"""Speed and memory of the demo, measured: prints a table and writes JSON.

  python benchmarks/serve_bench.py [--weights FOLDER] [--images 60] [--users 16] [--requests 25] [--out FILE]

In-process latency (median, p95) over real MURA radiographs for prediction alone, for prediction
plus the three maps from one shared pass and for Grad-CAM alone (what /explain serves), against the
naive way (three separate pytorch-grad-cam calls, each with its own forward and backward), and
for two-view studies with their maps and the one-page PDF report; then the real app over
loopback: cold start, peak resident memory, 16 concurrent gradio_client users, memory drift over
500 sequential requests, and one ScoreCAM request (its time and the peak memory after it). Needs
../shared/data (or --data).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def pct(values, q):
    return float(np.percentile(values, q) * 1000)


def explain_auto(client, path: Path, method: str) -> bool:
    """One /explain request with the body part left to the model; False when the app answers that the image
    is no upper-extremity radiograph (a served answer: the model ran, there is just no map to draw)."""
    from gradio_client import handle_file
    from gradio_client.exceptions import AppError

    try:
        client.predict(handle_file(str(path)), "auto", method, api_name="/explain")
        return True
    except AppError as err:
        if "does not look like an upper-extremity radiograph" not in str(err):
            raise
        return False


def part_of(path: Path) -> str:
    """A MURA image's body part, from its folder (valid/XR_FOREARM/patient/study/image.png)."""
    return path.parents[2].name.removeprefix("XR_").lower()


def in_process(images: list[Path], studies: list[list[Path]], weights: str) -> dict:
    from pytorch_grad_cam import GradCAM, GradCAMPlusPlus
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    from mura_demo.core.imaging import load_image
    from mura_demo.serving.predictor import Predictor
    from mura_demo.serving.reading import routed_part
    from mura_demo.serving.report import render_report

    predictor = Predictor.from_spec(weights)
    model, layer, cfg = predictor.model, predictor.target_layer, predictor.config

    def naive(path):
        """The same answer (every pass of the config's test-time views), then three separate library
        calls, each with its own forward and backward."""
        view = predictor.view(load_image(path))
        x = view.x
        part = routed_part(cfg, view.scores.body_part, "auto")[0] or "forearm"
        target = [ClassifierOutputTarget(cfg.abnormality_index(part))]
        for cls in (GradCAM, GradCAMPlusPlus):
            with cls(model, [layer]) as cam:
                cam.compute_input_gradient = True
                cam(x, target)
        xg = x.clone().requires_grad_(True)
        with torch.enable_grad():
            model(xg)[0, cfg.abnormality_index(part)].backward()

    runs = {
        "predict": lambda p: predictor.predict(p),
        "predict_and_3_maps": lambda p: predictor.analyze(p).overlays(),
        "gradcam_alone": lambda p: predictor.explain(p, methods=("gradcam",)).overlays(),  # as /explain
        "gradcam_alone_part_given": lambda p: predictor.explain(p, part_of(p), ("gradcam",)).overlays(),
        "naive_3_library_calls": naive,
    }
    for fn in runs.values():  # warm-up
        fn(images[0])
    # Interleaved image by image, so that the shared machine's slow spells hit every way alike.
    seconds: dict[str, list[float]] = {name: [] for name in runs}
    for path in images:
        for name, fn in runs.items():
            t = time.perf_counter()
            fn(path)
            seconds[name].append(time.perf_counter() - t)
    out = {name: {"median_ms": pct(s, 50), "p95_ms": pct(s, 95), "n": len(s)} for name, s in seconds.items()}
    out["speedup_vs_naive"] = out["naive_3_library_calls"]["median_ms"] / out["predict_and_3_maps"]["median_ms"]
    times = []
    for views in studies:
        t = time.perf_counter()
        render_report(predictor.analyze_study(views)).save(io.BytesIO(), format="PDF", resolution=150)
        times.append(time.perf_counter() - t)
    out["study_2_views_maps_pdf_report"] = {"median_ms": pct(times, 50), "p95_ms": pct(times, 95), "n": len(times)}
    # The page's confirm click (the detected part named as the user's) re-reads the study on screen;
    # before Predictor.revise it analysed the study again, maps and all.
    times: dict[str, list[float]] = {"confirm_click_revised": [], "confirm_click_analysed_again": []}
    for views in studies:
        shown = predictor.analyze_study(views)
        part = shown.study["body_part"] or "forearm"
        t = time.perf_counter()
        predictor.revise(shown, part, shown.methods)
        times["confirm_click_revised"].append(time.perf_counter() - t)
        t = time.perf_counter()
        predictor.analyze_study(views, part)
        times["confirm_click_analysed_again"].append(time.perf_counter() - t)
    out |= {name: {"median_ms": pct(s, 50), "p95_ms": pct(s, 95), "n": len(s)} for name, s in times.items()}
    return out


def rss_mb(pid: int) -> tuple[float, float]:
    """Current and peak resident memory of a process, in MB."""
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            fields[key] = value.split()[0]
    return int(fields["VmRSS"]) / 1024, int(fields["VmHWM"]) / 1024


def served(images: list[Path], users: int, per_user: int, sequential: int, weights: str) -> dict:
    """The app's figures over loopback, with every temporary file (the app's uploads, gradio_client's downloads,
    each of which leaves an emptied folder of its own in the temporary directory) in one folder removed after."""
    with tempfile.TemporaryDirectory(prefix="mura-bench-") as tmp:
        tempfile.tempdir, before = tmp, tempfile.tempdir
        try:
            return served_from(tmp, images, users, per_user, sequential, weights)
        finally:
            tempfile.tempdir = before


def served_from(tmp: str, images: list[Path], users: int, per_user: int, sequential: int, weights: str) -> dict:
    from gradio_client import Client, handle_file

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "GRADIO_SERVER_NAME": "127.0.0.1", "GRADIO_SERVER_PORT": str(port),
           "MURA_DEMO_WEIGHTS": weights, "TMPDIR": tmp}  # fmt: skip
    t0 = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "app.py"], cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)  # fmt: skip
    out: dict = {}
    try:
        while True:
            try:
                client = Client(f"http://127.0.0.1:{port}/", verbose=False)
                client.predict(handle_file(str(images[0])), "auto", api_name="/predict")
                break
            except Exception:
                if proc.poll() is not None or time.perf_counter() - t0 > 180:
                    raise RuntimeError("app did not start") from None
                time.sleep(0.2)
        out["cold_start_s"] = time.perf_counter() - t0

        latencies, failures, refused_other = [], [], []
        lock = threading.Lock()

        def user(k):
            c = Client(f"http://127.0.0.1:{port}/", verbose=False)
            for j in range(per_user):
                path = images[(k * per_user + j) % len(images)]
                t = time.perf_counter()
                try:
                    answered_other = not explain_auto(c, path, "gradcam")
                    with lock:
                        latencies.append(time.perf_counter() - t)
                        refused_other.append(answered_other)
                except Exception as err:  # counted, reported
                    with lock:
                        failures.append(repr(err))

        t = time.perf_counter()
        threads = [threading.Thread(target=user, args=(k,)) for k in range(users)]
        for th in threads:
            th.start()
        for th in threads:
            th.join()
        wall = time.perf_counter() - t
        out["load"] = {"users": users, "requests": users * per_user, "failed": len(failures),
                       "answered_other": sum(refused_other), "throughput_rps": len(latencies) / wall,
                       "median_ms": pct(latencies, 50), "p95_ms": pct(latencies, 95)}  # fmt: skip

        # Resident memory around request 20, half-way and at the end: a leak keeps growing in the
        # second half, while the allocator's early steps (arenas, caches) level off. Each mark is the
        # median over the 20 requests up to it, as the server hands freed pages back every few seconds.
        first, half, window, samples = min(20, sequential), max(1, sequential // 2), 20, {}
        marks = (first, half, sequential)
        for i in range(1, sequential + 1):
            explain_auto(client, images[(i - 1) % len(images)], "gradcam++")
            for mark in marks:
                if mark - window < i <= mark:
                    samples.setdefault(mark, []).append(rss_mb(proc.pid)[0])
        rss = {mark: float(np.median(samples[mark])) for mark in marks}
        out["memory"] = {
            **{f"rss_around_{i}_mb": r for i, r in rss.items()},
            "drift_mb": rss[sequential] - rss[first],
            "second_half_drift_mb": rss[sequential] - rss[half],
            "peak_rss_mb": rss_mb(proc.pid)[1],
        }
        t = time.perf_counter()
        client.predict(handle_file(str(images[0])), part_of(images[0]), "scorecam", api_name="/explain")
        out["scorecam"] = {"seconds": time.perf_counter() - t, "peak_rss_after_mb": rss_mb(proc.pid)[1]}
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=str(ROOT.parent / "shared" / "data"))
    parser.add_argument("--weights", default=str(ROOT / "weights"), help="weights folder (default: the bundled one)")
    parser.add_argument("--images", type=int, default=60)
    parser.add_argument("--users", type=int, default=16)
    parser.add_argument("--requests", type=int, default=25)
    parser.add_argument("--sequential", type=int, default=500)
    parser.add_argument("--out", default="runs/bench.json")
    args = parser.parse_args()
    valid = sorted(Path(args.data, "MURA-v1.1", "valid").glob("*/*/*/*.png"))
    if not valid:
        print(f"no radiographs under {args.data}", file=sys.stderr)
        return 2
    images = valid[:: max(1, len(valid) // args.images)][: args.images]
    folders = sorted({p.parent for p in images})
    studies = [views[:2] for views in (sorted(f.glob("*.png")) for f in folders) if len(views) >= 2][:20]
    result = {"threads": torch.get_num_threads(), "cpus": os.cpu_count(), "images": len(images)}
    result["weights"] = str(Path(args.weights).resolve())
    result["in_process"] = in_process(images, studies, result["weights"])
    print(json.dumps(result["in_process"]), flush=True)
    result["served"] = served(images, args.users, args.requests, args.sequential, result["weights"])
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))
    ip, sv = result["in_process"], result["served"]
    rows = [
        ("predict (body part + abnormality), median / p95",
         f"{ip['predict']['median_ms']:.0f} / {ip['predict']['p95_ms']:.0f} ms"),
        ("predict + 3 maps (shared pass), median / p95",
         f"{ip['predict_and_3_maps']['median_ms']:.0f} / {ip['predict_and_3_maps']['p95_ms']:.0f} ms"),
        ("Grad-CAM alone (as /explain), median / p95",
         f"{ip['gradcam_alone']['median_ms']:.0f} / {ip['gradcam_alone']['p95_ms']:.0f} ms"),
        ("  with the body part given, median / p95",
         f"{ip['gradcam_alone_part_given']['median_ms']:.0f} / {ip['gradcam_alone_part_given']['p95_ms']:.0f} ms"),
        ("naive: 3 separate library calls, median", f"{ip['naive_3_library_calls']['median_ms']:.0f} ms"),
        ("speed-up of the shared pass", f"{ip['speedup_vs_naive']:.2f}x"),
        ("study of 2 views + maps + PDF report, median / p95",
         f"{ip['study_2_views_maps_pdf_report']['median_ms']:.0f} / "
         f"{ip['study_2_views_maps_pdf_report']['p95_ms']:.0f} ms"),
        ("confirm click on that study: re-read / analysed again, median",
         f"{ip['confirm_click_revised']['median_ms']:.1f} / {ip['confirm_click_analysed_again']['median_ms']:.0f} ms"),
        ("cold start to first answer", f"{sv['cold_start_s']:.1f} s"),
        (f"{sv['load']['users']} users x {args.requests} /explain: failed",
         f"{sv['load']['failed']} ({sv['load']['answered_other']} answered 'not an arm')"),
        ("  throughput, p95 latency", f"{sv['load']['throughput_rps']:.1f} req/s, {sv['load']['p95_ms']:.0f} ms"),
        ("peak resident memory (server)", f"{sv['memory']['peak_rss_mb']:.0f} MB"),
        (f"memory drift, request {min(20, args.sequential)} -> {args.sequential}",
         f"{sv['memory']['drift_mb']:+.0f} MB"),
        (f"  of which {args.sequential // 2} -> {args.sequential}", f"{sv['memory']['second_half_drift_mb']:+.0f} MB"),
        ("one ScoreCAM /explain; peak memory after it",
         f"{sv['scorecam']['seconds']:.0f} s; {sv['scorecam']['peak_rss_after_mb']:.0f} MB"),
    ]  # fmt: skip
    print("| measure | value |\n|---|---|")
    for k, v in rows:
        print(f"| {k} | {v} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
