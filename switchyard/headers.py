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
