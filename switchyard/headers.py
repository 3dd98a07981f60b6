"""Names shared by the data plane and the control plane."""

BACKEND_HEADER = "x-switchyard-backend"
"""Set by the ext_proc; Envoy routes on it. Stripped from client requests."""

DATA_CLASS_HEADER = "x-switchyard-data-class"
"""Client-declared sensitivity of a request's data; models list the classes they may see."""

DEFAULT_DATA_CLASS = "public"

METADATA_NAMESPACE = "switchyard"
"""Dynamic-metadata namespace the ext_proc writes its decision into."""

EXTPROC_FILTER = "envoy.filters.http.ext_proc"
"""Filter name; also the attribute namespace in ext_proc requests."""

SERVED_MODEL_ATTRIBUTE = "xds.upstream_host_metadata.filter_metadata['switchyard']['model']"
STATUS_ATTRIBUTE = "response.code"
RESPONSE_ATTRIBUTES = (STATUS_ATTRIBUTE, SERVED_MODEL_ATTRIBUTE)
"""What Envoy sends the ext_proc with a response's first body chunk: its status, and the model
that answered (every model's endpoints carry its name as metadata; after a fallback, the host
that answered is another model's)."""

CLIENT_KEY_HEADERS = ("authorization", "x-api-key")
"""Where clients present their API key; never forwarded upstream (the routes remove them)."""

JWT_PAYLOAD_HEADER = "x-switchyard-jwt-payload"
"""Where Envoy's jwt_authn puts a verified token's payload for the ext_proc; a client's own is
removed before anything reads it."""

NO_FALLBACK_SUFFIX = "~direct"
"""Appended by the ext_proc to a backend key for a client key that may not use every one of the
model's fallbacks: with client keys on, each model with fallbacks has a route for it, to the
model's own cluster (no per-attempt fallback to a model the key disallows)."""
REQUEST_ID_HEADER = "x-request-id"
"""Envoy generates it for every request (a client's own is removed first) and returns it on
every response; recorded requests are filed under it and ``POST /v1/feedback`` names it."""

FEEDBACK_PATH = "/v1/feedback"
"""Where clients score a recorded request (answered by the ext_proc)."""

SHADOW_HEADER = "x-switchyard-shadow"
"""Marks the gateway's own shadow-evaluation requests (``extproc/shadow.py``): ``<role>
<secret>``, honoured only with the ext_proc's secret, which never leaves the gateway (the
routes of a shadowing policy remove the header before the provider sees it)."""
