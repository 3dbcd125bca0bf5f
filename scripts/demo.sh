#!/usr/bin/env bash
set -euo pipefail
echo "not yet: training lands with the training issue (#4)" >&2
exit 1
