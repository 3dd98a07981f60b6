# Sourced by the build_<tool>.sh scripts here: the shared builder lives in the package, which
# needs it for `switchyard up --jaeger` (switchyard/local/build_jaeger.sh).
# shellcheck source=../../switchyard/local/go_tool.sh
source "$(dirname "${BASH_SOURCE[0]}")/../../switchyard/local/go_tool.sh"
