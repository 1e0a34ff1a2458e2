"""`videochat` command line: ask | chat | health | loadtest.

Exit status: 0 success, 2 invalid argument (bad flags, a bad video, or a local file that cannot be read or
written: --resume, --save, --out, --plot, TLS files; checked before any request), 3 server unavailable
(unreachable, not ready, or the model is not loaded), 1 anything else. Errors go to stderr as one line,
`videochat: error: <GRPC_STATUS>: <server's message>`."""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
from typing import List, Optional

from .client import VideoChatClient
from .conversation import Conversation
from .errors import AnswerRestarted, InvalidArgument, Unavailable, VideoChatError
from .loadtest.config import DEFAULT_CONNECTIONS as LOAD_CONNECTIONS
from .schema import DEFAULTS, MODEL_NAME

EXIT_OK, EXIT_ERROR, EXIT_INVALID, EXIT_UNAVAILABLE = 0, 1, 2, 3
DEFAULT_URL = os.environ.get("VIDEOCHAT_URL", "localhost:8001")


def exit_code(err: VideoChatError) -> int:
    if isinstance(err, InvalidArgument):
        return EXIT_INVALID
    if isinstance(err, Unavailable):
        return EXIT_UNAVAILABLE
    return EXIT_ERROR


def _report(err: VideoChatError) -> int:
    print(f"videochat: error: {err.code}: {err.message}", file=sys.stderr)
    return exit_code(err)


# -- local files: checked before any request, so a typo costs no server time and exits 2, not 1 -------------
def _readable(path: str, flag: str) -> str:
    try:
        with open(path, "rb"):
            pass
    except OSError as e:   # missing, a directory, no permission
        raise InvalidArgument(f"cannot read {flag} file {path!r}: {e.strerror or e}") from None
    return path


def _writable(path: Optional[str], flag: str, *, makes_folders: bool = False) -> None:
    """Refuse an output path that cannot be a file: a directory, or under a missing folder (or a file)."""
    if not path:
        return
    if os.path.isdir(path):
        raise InvalidArgument(f"cannot write {flag} file {path!r}: Is a directory")
    folder = os.path.dirname(os.path.abspath(path))
    while makes_folders and not os.path.exists(folder):   # the command creates the missing ones
        folder = os.path.dirname(folder)
    if not os.path.isdir(folder):
        why = "is not a folder" if os.path.exists(folder) else "does not exist"
        raise InvalidArgument(f"cannot write {flag} file {path!r}: folder {folder!r} {why}")


def _read_conversation(path: str, client: VideoChatClient, video: str) -> Conversation:
    """--resume FILE -> Conversation; a file that is not one saved by --save is an invalid argument."""
    try:
        with open(_readable(path, "--resume")) as f:
            saved = json.load(f)
    except (OSError, ValueError) as e:   # ValueError: not JSON, or not UTF-8 text
        raise InvalidArgument(f"--resume file {path!r} is not a saved conversation: {e}") from None
    if not isinstance(saved, dict):
        raise InvalidArgument(f"--resume file {path!r} is not a saved conversation (not a JSON object)")
    try:
        return Conversation.from_json(saved, client, video=video)
    except TypeError as e:   # unknown or missing fields, e.g. in "media"
        raise InvalidArgument(f"--resume file {path!r} is not a saved conversation: {e}") from None


# -- argument types -------------------------------------------------------------------------------------
def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not value > 0:   # a deadline <= 0 fails every call with DEADLINE_EXCEEDED (exit 1)
        raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
    return value


def _non_negative_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value


# -- argument groups ------------------------------------------------------------------------------------
def _connection(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("connection")
    g.add_argument("--url", default=DEFAULT_URL,
                   help="Triton gRPC HOST:PORT, several comma-separated (retries fail over to the next), or a gRPC "
                        "target such as dns:///HOST:PORT (calls round robin over its addresses) "
                        "(default $VIDEOCHAT_URL or %(default)s)")
    g.add_argument("--timeout", type=_positive_float, default=600.0,
                   help="per-request deadline, seconds (default %(default)s)")
    g.add_argument("--retries", type=_non_negative_int, default=2,
                   help="retries of UNAVAILABLE / draining-replica errors, and of a turn whose replica was lost "
                        "mid-answer (default %(default)s)")
    _tls_and_headers(g)


def _tls_and_headers(g) -> None:
    g.add_argument("--ssl", action="store_true", help="use TLS")
    g.add_argument("--root-certificates", help="PEM file with the CA certificates")
    g.add_argument("--private-key", help="PEM file with the client key (mTLS)")
    g.add_argument("--certificate-chain", help="PEM file with the client certificate chain (mTLS)")
    g.add_argument("--header", action="append", default=[], metavar="KEY=VALUE", help="extra gRPC metadata")


def _media(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("media")
    g.add_argument("--image", action="store_true", help="the input is one image (or use one frame of the video)")
    g.add_argument("--num-segments", type=int, default=DEFAULTS.num_segments, help="frames sampled (default %(default)s)")
    g.add_argument("--hd-num", type=int, default=DEFAULTS.hd_num, help="max tiles with --padding (default %(default)s)")
    g.add_argument("--padding", action="store_true", help="HD mode with padding")
    g.add_argument("--msg", default="", help="system text after the media (model card's msg)")
    g.add_argument("--instruction", default=None, help="QFormer/LLM instruction")
    g.add_argument("--no-media-reference", action="store_true",
                   help="send the video's bytes every turn (default: follow-ups send the server's media_key and "
                        "re-upload only if it missed)")


def _generation(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("generation (greedy unless --sample)")
    g.add_argument("--max-new-tokens", type=int, default=DEFAULTS.max_new_tokens)
    g.add_argument("--sample", action="store_true", help="sample instead of greedy decoding")
    g.add_argument("--temperature", type=float)
    g.add_argument("--top-p", type=float)
    g.add_argument("--top-k", type=int)
    g.add_argument("--repetition-penalty", type=float)
    g.add_argument("--seed", type=int)


def _headers(args) -> dict:
    """--header KEY=VALUE flags -> gRPC metadata; the TLS files are checked readable on the way."""
    headers = {}
    for h in args.header:
        k, sep, v = h.partition("=")
        if not sep:
            raise InvalidArgument(f"--header wants KEY=VALUE, got {h!r}")
        headers[k.strip().lower()] = v
    for flag, path in (("--root-certificates", args.root_certificates), ("--private-key", args.private_key),
                       ("--certificate-chain", args.certificate_chain)):
        if path:   # tritonclient would fail inside its constructor: exit 1 and a traceback from its __del__
            _readable(path, flag)
    return headers


def _client(args) -> VideoChatClient:
    headers = _headers(args)
    return VideoChatClient(args.url, timeout=args.timeout, max_retries=args.retries, ssl=args.ssl,
                           root_certificates=args.root_certificates, private_key=args.private_key,
                           certificate_chain=args.certificate_chain, headers=headers)


def _gen_kwargs(args) -> dict:
    return dict(max_new_tokens=args.max_new_tokens, do_sample=args.sample, temperature=args.temperature,
                top_p=args.top_p, top_k=args.top_k, repetition_penalty=args.repetition_penalty, seed=args.seed)


def _conversation(client: VideoChatClient, args) -> Conversation:
    if getattr(args, "resume", None):
        conv = _read_conversation(args.resume, client, args.video)
        if args.no_media_reference:
            conv.media_reference, conv.media_key = False, None
        return conv
    return client.conversation(args.video, image=args.image, num_segments=args.num_segments, hd_num=args.hd_num,
                               padding=args.padding, msg=args.msg, instruction=args.instruction,
                               media_reference=not args.no_media_reference)


def _save(conv: Conversation, path: Optional[str]) -> None:
    if path:
        with open(path, "w") as f:
            f.write(conv.to_json())


# -- commands -------------------------------------------------------------------------------------------
def _print_stream(stream, *, quiet: bool = False) -> None:
    """Print an answer as it streams. A restart (its replica was lost mid-answer) is said on stderr and the new
    answer is printed from its start on a new line."""
    while stream.answer is None:
        try:
            for piece in stream:
                if not quiet:
                    print(piece, end="", flush=True)
        except AnswerRestarted as e:
            if not quiet:
                print(file=sys.stdout, flush=True)
            print(f"videochat: {e}", file=sys.stderr, flush=True)


def cmd_ask(args) -> int:
    _writable(args.save, "--save")
    turns = []
    with _client(args) as client:
        conv = _conversation(client, args)
        try:
            for question in args.questions:
                if args.stream:
                    stream = conv.ask_stream(question, **_gen_kwargs(args))
                    _print_stream(stream, quiet=args.json)
                    answer = stream.answer
                    if not args.json:
                        print()
                else:
                    answer = conv.ask(question, **_gen_kwargs(args))
                    if not args.json:
                        print(answer.text)
                turns.append({"prompt": question, "text": answer.text, "finish_reason": answer.finish_reason,
                              "latency_ms": round(answer.timings.latency_ms, 3),
                              "time_to_first_token_ms": None if answer.timings.time_to_first_token_ms is None
                              else round(answer.timings.time_to_first_token_ms, 3),
                              "usage": {"prompt_tokens": answer.usage.prompt_tokens,
                                        "completion_tokens": answer.usage.completion_tokens,
                                        "total_tokens": answer.usage.total_tokens},
                              "token_ids": list(answer.token_ids),
                              "video_bytes_sent": answer.video_bytes_sent, "reuploaded": answer.reuploaded})
        finally:
            _save(conv, args.save)
    if args.json:
        print(json.dumps({"turns": turns}, ensure_ascii=False, indent=1))
    return EXIT_OK


def cmd_chat(args) -> int:
    _writable(args.save, "--save")
    interactive = sys.stdin.isatty()
    with _client(args) as client:
        conv = _conversation(client, args)
        try:
            while True:
                if interactive:
                    print("you> ", end="", file=sys.stderr, flush=True)
                line = sys.stdin.readline()
                if not line:
                    break
                question = line.strip()
                if not question:
                    continue
                if question.lower() in ("exit", "quit", "/exit", "/quit"):
                    break
                _print_stream(conv.ask_stream(question, **_gen_kwargs(args)))
                print()
        finally:
            _save(conv, args.save)
    return EXIT_OK


def cmd_health(args) -> int:
    if args.probe_count < 0:
        raise InvalidArgument(f"--probe-count must be >= 0, got {args.probe_count}")
    with _client(args) as client:
        try:
            state = client.health(timeout=min(args.timeout, 10.0))
        except Unavailable as e:
            out = {"url": args.url, "live": False, "ready": False, "model_ready": False,
                   "error": f"{e.code}: {e.message}"}
            if args.probe:
                out["probe"] = {"ok": False, "latency_ms": [], "count": 0, "error": out["error"], "code": e.code}
            print(json.dumps(out))
            return EXIT_UNAVAILABLE
        healthy = all(state.values())
        if args.probe:
            result = _run_probe(client, args) if healthy else None
            state["probe"] = result.to_dict() if result else {"ok": False, "latency_ms": [], "count": 0,
                                                               "error": "not probed: server or model not ready",
                                                               "code": "UNAVAILABLE"}
            healthy = healthy and bool(result and result.ok)
    print(json.dumps({"url": args.url, **state}))
    return EXIT_OK if healthy else EXIT_UNAVAILABLE


def _run_probe(client: VideoChatClient, args):
    """`--probe-count 0`: one probe per instance of the most replicated model behind the ensemble."""
    from .probe import instance_counts, probe
    count = args.probe_count
    if count == 0:
        with client.triton() as raw:
            try:
                count = max(instance_counts(raw, model_name=client.config.model_name).values())
            except Exception:  # noqa: BLE001 - config API refused (e.g. no access): one probe still tells a lot
                count = 1
    return probe(client, count=count, timeout=args.probe_timeout)


def _csv(kind):
    def parse(text: str):
        try:
            values = [kind(x) for x in text.split(",") if x.strip()]
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a comma-separated list of {kind.__name__}, got {text!r}")
        if not values:
            raise argparse.ArgumentTypeError("empty list")
        return values
    return parse


def cmd_loadtest(args) -> int:
    from .loadtest import LoadConfig, run_loadtest, write_outputs
    from .loadtest.export import requests_path, write_requests
    from .loadtest.server_info import metrics_urls as replica_metrics_urls
    from .loadtest.stats import DEFAULT_PERCENTILES, parse_goodput, parse_percentiles
    from .protocol import MediaOptions
    if args.concurrency is None and args.rate is None:
        args.concurrency = [1]
    if args.requests is not None and args.duration is not None:
        raise InvalidArgument("give --requests or --duration, not both")
    _writable(args.out, "--out", makes_folders=True)       # else found only after the whole sweep
    _writable(os.path.splitext(args.out)[0] + ".csv", "--out (its .csv)", makes_folders=True)
    _writable(requests_path(args.out), "--out (its .requests.jsonl)", makes_folders=True)
    _writable(args.plot, "--plot")
    urls = [u.strip() for flag in (args.url or [DEFAULT_URL]) for u in flag.split(",") if u.strip()]
    try:
        percentiles = parse_percentiles(args.percentiles) if args.percentiles else list(DEFAULT_PERCENTILES)
        slos = parse_goodput(args.goodput) if args.goodput else None
        metrics_urls = [] if args.no_metrics else replica_metrics_urls(urls, args.metrics_url or [])
    except ValueError as e:
        raise InvalidArgument(str(e)) from None
    headers = _headers(args)
    cfg = LoadConfig(
        url=urls[0], urls=urls, metrics_urls=metrics_urls, percentiles=percentiles, goodput=slos,
        model_name=args.model, ssl=args.ssl, root_certificates=args.root_certificates, private_key=args.private_key,
        certificate_chain=args.certificate_chain, headers=tuple(sorted(headers.items())), videos=args.video, concurrency=args.concurrency or (), rate=args.rate or (),
        requests=args.requests, duration=args.duration, turns=args.turns, max_new_tokens=args.max_new_tokens,
        stream=args.stream, warmup=args.warmup, prompts=args.prompt or LoadConfig.prompts,
        media=MediaOptions(image=args.image, num_segments=args.num_segments, hd_num=args.hd_num,
                           padding=args.padding, msg=args.msg, instruction=args.instruction),
        timeout=args.timeout, retries=args.retries, max_inflight=args.max_inflight,
        metrics_url=metrics_urls[0] if metrics_urls else None, seed=args.seed,
        media_reference=not args.no_media_reference, connections=args.connections)
    try:
        cfg.validate()
    except ValueError as e:
        raise InvalidArgument(str(e)) from None
    per_level = []
    report = asyncio.run(run_loadtest(cfg, progress_stream=None if args.quiet else sys.stderr,
                                      records_sink=lambda level, records: per_level.append((level, records))))
    write_requests(requests_path(args.out), per_level)
    try:
        paths = write_outputs(report, args.out, plot=args.plot)
        paths["requests"] = requests_path(args.out)
    except RuntimeError as e:   # matplotlib missing: the JSON and CSV are written already
        print(f"videochat: error: {e}", file=sys.stderr)
        return EXIT_ERROR
    for lv in report["levels"]:
        key = "concurrency" if "concurrency" in lv else "rate"
        lat = lv["latency_ms"] or {}
        print(f"{key}={lv[key]}: {lv['requests_per_second']:.2f} req/s, {lv['output_tokens_per_second']:.1f} tok/s, "
              f"p50 {lat.get('p50', float('nan')):.1f} ms, p99 {lat.get('p99', float('nan')):.1f} ms, "
              f"errors {lv['errors'] or 0}", file=sys.stderr)
    print(json.dumps(paths))
    return EXIT_OK


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="videochat", description="Client for InternVideo2-Chat-8B-HD on Triton "
                                "(ensemble `videochat`). Exit status: 0 ok, 2 invalid argument, 3 unavailable, 1 other.")
    sub = p.add_subparsers(dest="command", required=True)

    a = sub.add_parser("ask", help="ask one or more questions (a multi-turn conversation) about a video")
    a.add_argument("video", help="video (or image with --image) file")
    a.add_argument("questions", nargs="+", help="questions, asked in order as one conversation")
    _connection(a), _media(a), _generation(a)
    a.add_argument("--stream", action="store_true", help="print answers as they are generated")
    a.add_argument("--json", action="store_true", help='print {"turns": [{"prompt", "text", "latency_ms", "usage", "video_bytes_sent", ...}, ...]}')
    a.add_argument("--save", metavar="FILE", help="write the conversation (history, options) as JSON")
    a.add_argument("--resume", metavar="FILE", help="continue a conversation saved with --save")
    a.set_defaults(func=cmd_ask)

    c = sub.add_parser("chat", help="interactive conversation: questions from stdin until EOF or 'exit'")
    c.add_argument("video")
    _connection(c), _media(c), _generation(c)
    c.add_argument("--save", metavar="FILE", help="write the conversation as JSON at the end")
    c.add_argument("--resume", metavar="FILE", help="continue a conversation saved with --save")
    c.set_defaults(func=cmd_chat)

    h = sub.add_parser("health", help="server live + ready and the `videochat` model ready (exit 0, else 3); "
                                      "--probe: also a real 1-token inference through the ensemble")
    _connection(h)
    h.add_argument("--probe", action="store_true",
                   help="send a tiny built-in image with max_new_tokens=1 through the ensemble (catches dead workers "
                        "that Triton still reports READY)")
    h.add_argument("--probe-count", type=int, default=0,
                   help="probes in a row; 0 = one per instance of the most replicated model (default)")
    h.add_argument("--probe-timeout", type=float, default=10.0, help="deadline of each probe, seconds (default %(default)s)")
    h.set_defaults(func=cmd_health)

    t = sub.add_parser("loadtest", help="closed-loop concurrency or open-loop rate sweep; JSON + CSV (+ PNG) report")
    t.add_argument("--url", action="append", metavar="HOST:PORT",
                   help="Triton gRPC endpoint; repeat (or comma-separate) for several replicas: sessions are "
                        f"spread round robin over them (default $VIDEOCHAT_URL or {DEFAULT_URL})")
    t.add_argument("--model", default=MODEL_NAME, help="model name (default %(default)s)")
    t.add_argument("--video", nargs="+", required=True, help="videos used round robin (one per session)")
    lv = t.add_mutually_exclusive_group()
    lv.add_argument("--concurrency", type=_csv(int), help="closed-loop levels, e.g. 1,4,16 (default 1)")
    lv.add_argument("--rate", type=_csv(float), help="open-loop Poisson request rates, e.g. 0.5,1,2 (req/s)")
    t.add_argument("--requests", type=int, help="requests per level (default 32)")
    t.add_argument("--duration", type=float, help="seconds per level instead of a request count")
    t.add_argument("--turns", type=int, default=1, help="turns per session (default %(default)s)")
    t.add_argument("--max-new-tokens", type=int, default=64)
    t.add_argument("--stream", action="store_true", help="stream answers (reports TTFT and inter-token latency)")
    t.add_argument("--warmup", type=int, default=0, help="unmeasured requests before the first level")
    t.add_argument("--prompt", action="append", help="question for turn k (repeat; cycles). Default: 4 generic ones")
    t.add_argument("--timeout", type=_positive_float, default=300.0, help="per-request deadline, seconds")
    t.add_argument("--retries", type=_non_negative_int, default=0,
                   help="client retries (default 0: errors are counted)")
    t.add_argument("--max-inflight", type=int, default=256, help="open loop: at most this many sessions at once")
    t.add_argument("--metrics-url", action="append",
                   help="Triton metrics HOST:PORT or URL, one per --url in order (default: each --url's host, "
                        "port 8002)")
    t.add_argument("--percentiles", default=None,
                   help="latency percentiles, each reported as pNN (default 50,90,95,99; p50/p90/p99 always)")
    t.add_argument("--goodput", nargs="+", metavar="SLO=MS",
                   help="SLOs in ms (ttft_ms, latency_ms, itl_ms), e.g. ttft_ms=500 latency_ms=10000: report the "
                        "share of requests that met all of them and their rate")
    t.add_argument("--connections", type=int, default=LOAD_CONNECTIONS,
                   help="gRPC connections per address the sessions are spread over, so an L4 balancer in front "
                        "spreads them over its replicas (default %(default)s)")
    t.add_argument("--no-metrics", action="store_true", help="do not scrape server metrics")
    t.add_argument("--seed", type=int, default=0, help="seed of the Poisson arrivals")
    t.add_argument("--out", required=True, help="report JSON path (the CSV goes next to it)")
    t.add_argument("--plot", help="PNG with latency and throughput vs level (needs matplotlib)")
    t.add_argument("--quiet", action="store_true", help="no progress bar")
    _tls_and_headers(t.add_argument_group("TLS and metadata (as for ask)"))
    _media(t)
    t.set_defaults(func=cmd_loadtest)
    return p


def main(argv: Optional[List[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:2] == ["loadtest", "compare"]:      # `loadtest` keeps its flags; compare is its own parser
        from .loadtest.compare import compare_parser
        args = compare_parser().parse_args(argv[2:])
    else:
        args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except VideoChatError as e:
        return _report(e)
    except OSError as e:
        print(f"videochat: error: {e}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        print("videochat: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
