"""The predictive strategy through the real gateway (Envoy, ext_proc workers, demo upstreams)
with a bundle fitted in the test by `switchyard router fit` on a small synthetic outcome file:
the right model depends on the prompt's topic, not its length, and the gateway sends each
prompt to the model the bundle predicts."""

from __future__ import annotations

import io
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import openai
import pytest
from gateway_harness import DEMO_NAMES, Gateway, start_gateway
from routing_data import write_topic_outcomes

from switchyard.extproc.router import cli
from switchyard.local.ports import free_port_block

MATH = "tell me about the eigenvalue integral theorem of the manifold"
CHAT = "tell me about the kitchen river and the garden restaurant"


def _outcomes(path: Path, n: int = 200) -> Path:
    """``specialist`` answers prompts of HARD words, ``generalist`` those of EASY words."""
    return write_topic_outcomes(path, n, on_math=(0.9, 0.3), on_easy=(0.2, 0.9))


def _model(name: str, port: int, price: float, classes: list[str]) -> dict[str, Any]:
    return {
        "name": name,
        "backend": {"url": f"http://127.0.0.1:{port}"},
        "upstreamModel": f"{name}-model",
        "pricing": {"inputPer1M": price, "outputPer1M": 4 * price},
        "dataClasses": classes,
    }


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    root = tmp_path_factory.mktemp("predictive")
    bundle = root / "bundle"
    fit_args = ["fit", "--outcomes", str(_outcomes(root / "outcomes.jsonl"))]
    out = io.StringIO()
    assert cli.main([*fit_args, "--out", str(bundle), "--force"], stdout=out) == 0, out.getvalue()
    first = free_port_block(len(DEMO_NAMES))
    ports = {name: first + i for i, name in enumerate(DEMO_NAMES)}
    policy = {
        "apiVersion": "switchyard.dev/v1alpha1",
        "kind": "RoutePolicy",
        "metadata": {"name": "predicted", "namespace": "default"},
        "spec": {
            "match": {"models": ["auto"]},
            "models": [
                _model("generalist", ports["demo-light"], 0.1, ["public", "internal"]),
                _model("specialist", ports["demo-standard"], 1.0, ["public"]),
            ],
            "strategy": {
                "type": "predictive",
                "router": {"bundle": str(bundle)},
                "predictive": {"maxQualityLoss": 0.05},
                "default": "generalist",
            },
        },
    }
    demos = [{"name": n, "port": p} for n, p in ports.items()]
    directory = tmp_path_factory.mktemp("predictive-gateway")
    running = start_gateway(directory, policy, demoUpstreams=demos)
    yield running
    assert running.stop() == 0, "".join(running.output)


@pytest.fixture(scope="module")
def client(gateway: Gateway) -> openai.OpenAI:
    return openai.OpenAI(base_url=gateway.base_url, api_key="not-needed", max_retries=0)


def _chat(client: openai.OpenAI, prompt: str, headers: dict[str, str] | None = None) -> Any:
    return client.chat.completions.with_raw_response.create(
        model="auto", messages=[{"role": "user", "content": prompt}], extra_headers=headers
    )


@pytest.mark.parametrize(
    ("prompt", "model", "demo"),
    [(MATH, "specialist", "demo-standard"), (CHAT, "generalist", "demo-light")],
)
def test_the_gateway_routes_each_topic_to_the_predicted_model(
    client: openai.OpenAI, prompt: str, model: str, demo: str
) -> None:
    raw = _chat(client, prompt)
    assert raw.http_response.status_code == 200
    assert raw.headers["x-switchyard-model"] == model
    assert raw.headers["x-switchyard-reason"].startswith(f"predictive: {model} ")
    assert " >= best " in raw.headers["x-switchyard-reason"]
    assert raw.parse().choices[0].message.content.startswith(f"[demo:{demo}]")


def test_a_model_the_data_class_excludes_is_not_chosen(client: openai.OpenAI) -> None:
    raw = _chat(client, MATH, {"x-switchyard-data-class": "internal"})
    assert raw.headers["x-switchyard-model"] == "generalist"
    assert raw.headers["x-switchyard-reason"].startswith("predictive: generalist ")
