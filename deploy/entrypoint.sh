#!/bin/sh
# The image's entrypoint (PID 1 is tini, which forwards signals to the process this script becomes and
# reaps orphans). Three ways in:
#
#   (no argument) or options   ember-launcher with those options, bound to every interface; settings come
#                              from options or TGI's environment names (MODEL_ID, PORT, NUM_SHARD, ...)
#   serve                      Amazon SageMaker's way: port 8080 (/ping, /invocations), the model and its
#                              settings from SageMaker's variables, mapped as TGI's sagemaker-entrypoint.sh
#                              maps them (below); further options go to the launcher
#   any other command          run as given (`docker run -it ember bash`)
set -eu

log() {
    echo "ember-entrypoint: $*" >&2
}

# SageMaker's variables (TGI's mapping). Ember has no --revision and runs no code from a model repository,
# so HF_MODEL_REVISION and HF_MODEL_TRUST_REMOTE_CODE are reported and left out, not silently dropped.
# SM_NUM_GPUS is 0 on CPU instances, where the launcher's default (one shard) applies.
sagemaker_env() {
    if [ -z "${HF_MODEL_ID:-}" ]; then
        log "HF_MODEL_ID must be set"
        exit 1
    fi
    export MODEL_ID="$HF_MODEL_ID"
    if [ -n "${SM_NUM_GPUS:-}" ] && [ "$SM_NUM_GPUS" != 0 ]; then
        export NUM_SHARD="$SM_NUM_GPUS"
    fi
    if [ -n "${HF_MODEL_QUANTIZE:-}" ]; then
        export QUANTIZE="$HF_MODEL_QUANTIZE"
    fi
    if [ -n "${HF_MODEL_REVISION:-}" ]; then
        log "HF_MODEL_REVISION=$HF_MODEL_REVISION ignored: Ember serves the model's current files (no --revision)"
    fi
    if [ -n "${HF_MODEL_TRUST_REMOTE_CODE:-}" ]; then
        log "HF_MODEL_TRUST_REMOTE_CODE ignored: Ember runs no code from a model repository"
    fi
}

# A bind-mounted cache the image's user cannot write fails deep in the first download: say so up front.
if [ -n "${EMBER_CACHE:-}" ] && [ -d "$EMBER_CACHE" ] && [ ! -w "$EMBER_CACHE" ]; then
    log "warning: $EMBER_CACHE is not writable by uid $(id -u) (gid $(id -g)): models cannot be cached there;" \
        "use a named volume, or make the folder writable (chown -R $(id -u):0 DIR)"
fi

case "${1:-}" in
    serve)
        shift
        sagemaker_env
        exec ember-launcher --hostname 0.0.0.0 --port 8080 "$@"
        ;;
    ember-launcher)
        shift
        exec ember-launcher --hostname 0.0.0.0 "$@"
        ;;
    "" | -*)
        # Docker sets HOSTNAME to the container's id, which the launcher would bind (TGI's env name):
        # bind every interface unless a --hostname below says otherwise.
        exec ember-launcher --hostname 0.0.0.0 "$@"
        ;;
    *)
        exec "$@"
        ;;
esac
