"""What the load ran against: each replica's model configuration (Triton's model-config API: the public model
and, for an ensemble, every model it runs) and Prometheus scrapes of each replica, summed for the fleet."""
from __future__ import annotations

from typing import Dict, List, Optional, Sequence, Tuple
from urllib.parse import urlsplit

from ..client import parse_urls
from ..metrics import Scrape
from ..protocol import is_resolver_target


def default_metrics_url(grpc_url: str) -> str:
    """Port 8002 on the host of the (first) address; a resolver target's (dns:///, ipv4:) first address."""
    first = parse_urls(grpc_url)[0]
    if is_resolver_target(first):
        first = first.split(":", 1)[1].lstrip("/").split(",")[0]
    host = urlsplit("//" + first).hostname or "localhost"
    host = f"[{host}]" if ":" in host else host
    return f"http://{host}:8002/metrics"


def normalize_metrics_url(url: str) -> str:
    """HOST:PORT or a URL -> http(s)://HOST:PORT/metrics"""
    url = url if url.startswith("http") else "http://" + url
    return url if url.rstrip("/").endswith("/metrics") else url.rstrip("/") + "/metrics"


def metrics_urls(urls: Sequence[str], given: Sequence[str]) -> List[str]:
    """One metrics URL per replica: the given ones in order, else each replica's host on port 8002."""
    if given and len(given) not in (1, len(urls)):
        raise ValueError(f"give one --metrics-url per --url ({len(urls)}), or one; got {len(given)}")
    if len(given) == len(urls):
        return [normalize_metrics_url(u) for u in given]
    if given:   # one URL for the whole fleet (a federating Prometheus, or a single replica)
        return [normalize_metrics_url(given[0])]
    return [default_metrics_url(u) for u in urls]


def model_config(client_kwargs: dict, model: str) -> Dict[str, object]:
    """{model: config} for `model` and, if it is an ensemble, each of its steps; {"error": ...} on failure."""
    import tritonclient.grpc as grpcclient

    out: Dict[str, object] = {}
    try:
        client = grpcclient.InferenceServerClient(**client_kwargs)
    except Exception as e:  # noqa: BLE001 - a report without the config is still a report
        return {"error": f"{type(e).__name__}: {e}"}
    try:
        todo = [model]
        while todo:
            name = todo.pop(0)
            if name in out:
                continue
            config = client.get_model_config(name, as_json=True, client_timeout=10).get("config", {})
            out[name] = config
            steps = (config.get("ensemble_scheduling") or {}).get("step") or []
            todo.extend(step["model_name"] for step in steps if "model_name" in step)
    except Exception as e:  # noqa: BLE001 - no access to the config API (a balancer may not route it)
        out["error"] = f"{type(e).__name__}: {e}"[:300]
    finally:
        client.close()
    return out


def fleet_scrape(scrapes: Sequence[Optional[Scrape]]) -> Optional[Scrape]:
    """The replicas' samples summed (counters and gauges alike); None if any replica could not be scraped."""
    if not scrapes or any(s is None for s in scrapes):
        return None
    total = Scrape()
    for s in scrapes:
        total.types.update(s.types)
        for key, value in s.samples.items():
            total.samples[key] = total.samples.get(key, 0.0) + value
    return total


def scrape_all(urls: Sequence[str], try_scrape) -> Tuple[List[Optional[Scrape]], List[Optional[str]]]:
    results = [try_scrape(u) for u in urls]
    return [r[0] for r in results], [r[1] for r in results]
