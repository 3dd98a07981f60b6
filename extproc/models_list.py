"""The body of ``GET /v1/models``: every alias and model a config serves, or those one client
key may use.

Without client keys Envoy answers the path itself from the config (a direct response, no
Python per request). With client keys the route sends the request headers to the ext_proc,
which checks the key and answers with the entries it allows: an alias when the key may use it,
a model (by its name and its ``namespace/policy/name`` id) when the key may use that model.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from switchyard.api.v1 import routing_pb2 as pb

MODELS_PATH = "/v1/models"


@dataclass(frozen=True, slots=True)
class ListedModel:
    """One entry of the list."""

    id: str
    owned_by: str
    alias: str = ""
    """The alias this entry is ("" for a model)."""
    model: str = ""
    """The model name this entry lists ("" for an alias)."""


def listed_models(config: pb.RoutingConfig) -> tuple[ListedModel, ...]:
    """The config's entries, sorted by id; the first policy to name an id owns it."""
    entries: dict[str, ListedModel] = {}
    for policy in config.policies:
        owner = f"{policy.namespace}/{policy.name}"
        for alias in policy.aliases:
            entries.setdefault(alias, ListedModel(alias, "switchyard-alias", alias=alias))
        for model in policy.models:
            entries.setdefault(model.name, ListedModel(model.name, owner, model=model.name))
            qualified = f"{owner}/{model.name}"
            entries.setdefault(qualified, ListedModel(qualified, "switchyard", model=model.name))
    return tuple(entries[key] for key in sorted(entries))


def models_body(
    entries: tuple[ListedModel, ...],
    aliases: frozenset[str] | None = None,
    models: frozenset[str] | None = None,
) -> str:
    """The OpenAI-style list of ``entries``, keeping only the ``aliases`` and ``models`` given
    (None: all of them)."""
    data = [
        {"id": e.id, "object": "model", "created": 0, "owned_by": e.owned_by}
        for e in entries
        if (
            aliases is None or e.alias in aliases
            if e.alias
            else models is None or e.model in models
        )
    ]
    return json.dumps({"object": "list", "data": data})
