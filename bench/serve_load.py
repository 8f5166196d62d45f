"""`slimtune serve` under load: requests/s and p50/p99 latency at 1, 4, 16 and 64 concurrent clients,
dynamic batching on and off, on the fine-tuned MiniLM (torch) and on its int8 ONNX export, against the
naive peer (a transformers pipeline behind FastAPI, one call per request).

    python bench/serve_load.py [--seconds 10] [--max-requests 3000] [--rounds 2] [--threads 2]

Every server runs at once on its own loopback port (idle ones take no CPU) and the cells are measured
interleaved, round by round (the median round is reported). Each client sends one SST-2 dev sentence per
request, the next as soon as the answer arrives (httpx, async, one process). Bounded: each cell stops at
--max-requests requests or --seconds, whichever comes first. The load generator shares the 2 cores with
the server, as a co-located client would: the absolute figures are low for both, the ratios are the result.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

from common import data_file, export_onnx_cached, machine_line, run_missing

HERE = Path(__file__).resolve().parent
CLIENTS = (1, 4, 16, 64)
FINETUNE = [{"stage": "finetune", "method": "full", "epochs": 1, "lr": 5e-5, "batch_size": 32}]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(name: str, command: list[str], logs: Path) -> dict:
    port = free_port()
    log = open(logs / f"{name}.log", "w")  # noqa: SIM115 - closed with the server
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    proc = subprocess.Popen([*command, "--port", str(port)], stdout=log, stderr=subprocess.STDOUT, env=env)
    return {"name": name, "proc": proc, "url": f"http://127.0.0.1:{port}", "log": log}


async def wait_up(server: dict) -> None:
    import httpx

    async with httpx.AsyncClient() as client:
        for _ in range(600):
            if server["proc"].poll() is not None:
                raise SystemExit(f"{server['name']} exited; see its log")
            try:
                if (await client.get(server["url"] + "/health", timeout=1)).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            await asyncio.sleep(0.2)
    raise SystemExit(f"{server['name']} did not come up")


async def load(url: str, texts: list[str], clients: int, max_requests: int, seconds: float) -> dict:
    """`clients` closed-loop clients, one text per request, until max_requests or seconds."""
    import httpx

    latencies, statuses, sent = [], Counter(), 0
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(limits=limits, timeout=120) as client:
        stop = time.monotonic() + seconds

        async def worker() -> None:
            nonlocal sent
            while sent < max_requests and time.monotonic() < stop:
                text = texts[sent % len(texts)]
                sent += 1
                started = time.perf_counter()
                try:
                    response = await client.post(url + "/v1/classify", json={"texts": [text]})
                    status = response.status_code
                except httpx.TransportError:
                    status = "transport"
                statuses[status] += 1
                if status == 200:
                    latencies.append(time.perf_counter() - started)

        began = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(clients)))
        elapsed = time.perf_counter() - began
    latencies.sort()
    pick = (lambda q: 1000 * latencies[min(len(latencies) - 1, int(q * len(latencies)))]) if latencies else (
        lambda q: float("nan"))
    return {"rps": len(latencies) / elapsed, "p50": pick(0.50), "p99": pick(0.99), "ok": len(latencies),
            "rejected": statuses.get(429, 0), "errors": sum(n for s, n in statuses.items() if s not in (200, 429))}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=Path, default=Path("runs/serve_bench"))
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--seconds", type=float, default=10.0)
    ap.add_argument("--max-requests", type=int, default=3000)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--clients", default=",".join(map(str, CLIENTS)))
    ap.add_argument("--out-json", type=Path, default=None)
    args = ap.parse_args()

    run_missing("minilm", args.runs, {"minilm-sst2": FINETUNE})
    model = args.runs / "minilm-sst2" / "model"
    onnx = export_onnx_cached(model, args.runs / "minilm-sst2-int8", quantize="dynamic")
    texts = [json.loads(line)["text"] for line in Path(data_file("dev")).read_text().splitlines()]
    logs = args.runs / "logs"
    logs.mkdir(parents=True, exist_ok=True)

    slimtune = [sys.executable, "-m", "slimtune", "serve"]
    common = ["--threads", str(args.threads), "--max-queue", "4096", "--feedback", "", "--log-level", "warning"]
    on, off = ["--max-batch", "32", "--max-wait-ms", "0"], ["--max-batch", "1", "--max-wait-ms", "0"]
    servers = [start("torch, batching", [*slimtune, str(model), *common, *on], logs),
               start("torch, no batching", [*slimtune, str(model), *common, *off], logs),
               start("ONNX int8, batching", [*slimtune, str(onnx), *common, *on], logs),
               start("ONNX int8, no batching", [*slimtune, str(onnx), *common, *off], logs),
               start("peer: transformers pipeline + FastAPI",
                     [sys.executable, str(HERE / "naive_pipeline_server.py"), str(model), "--threads",
                      str(args.threads)], logs)]
    clients = [int(c) for c in args.clients.split(",")]
    results: dict[tuple[str, int], list[dict]] = {}
    try:
        for server in servers:
            asyncio.run(wait_up(server))
            asyncio.run(load(server["url"], texts, 4, 40, 30))  # warm-up
        for round_ in range(args.rounds):
            for c in clients:
                for server in servers:
                    cell = asyncio.run(load(server["url"], texts, c, args.max_requests, args.seconds))
                    results.setdefault((server["name"], c), []).append(cell)
                    print(f"round {round_ + 1} {server['name']:<40} {c:>3} clients: {cell['rps']:7.1f} req/s  "
                          f"p50 {cell['p50']:7.1f} ms  p99 {cell['p99']:7.1f} ms  429s {cell['rejected']}  "
                          f"errors {cell['errors']}", file=sys.stderr, flush=True)
    finally:
        for server in servers:
            server["proc"].send_signal(signal.SIGTERM)
        for server in servers:
            try:
                server["proc"].wait(60)
            except subprocess.TimeoutExpired:
                server["proc"].kill()
            server["log"].close()

    def median_cell(name: str, c: int) -> dict:
        cells = sorted(results[(name, c)], key=lambda r: r["rps"])
        cell = dict(cells[len(cells) // 2])
        cell["errors"] = sum(r["errors"] for r in cells)
        cell["rejected"] = sum(r["rejected"] for r in cells)
        cell["rps_spread"] = (cells[0]["rps"], cells[-1]["rps"])
        return cell

    print(machine_line(args.threads, args.rounds, f"SST-2 dev sentences, one per request, httpx async clients on "
                       f"the same machine, each cell ≤ {args.max_requests} requests or {args.seconds:.0f} s"))
    print("| server | clients | req/s | p50 ms | p99 ms | errors | 429s |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    table = {}
    for server in servers:
        for c in clients:
            cell = table[(server["name"], c)] = median_cell(server["name"], c)
            print(f"| {server['name']} | {c} | {cell['rps']:.1f} | {cell['p50']:.1f} | {cell['p99']:.1f} | "
                  f"{cell['errors']} | {cell['rejected']} |")
    if 16 in clients:
        print("\nAt 16 clients:")
        peer = table[("peer: transformers pipeline + FastAPI", 16)]
        for runtime in ("torch", "ONNX int8"):
            on_, off_ = table[(f"{runtime}, batching", 16)], table[(f"{runtime}, no batching", 16)]
            print(f"- {runtime}: batching {on_['rps'] / off_['rps']:.2f}x the requests/s of no batching "
                  f"(p99 {on_['p99']:.0f} vs {off_['p99']:.0f} ms), {on_['rps'] / peer['rps']:.2f}x the peer's "
                  f"(p99 {on_['p99']:.0f} vs {peer['p99']:.0f} ms)")
    if args.out_json:
        args.out_json.write_text(json.dumps({f"{k[0]} @ {k[1]}": v for k, v in table.items()}, indent=2))


if __name__ == "__main__":
    main()
