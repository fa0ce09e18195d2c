#!/bin/sh
# Container entry: serve the INT8 checkpoint baked into the image (PREPARE_MODEL=1) unless
# Q8CHAT_MODEL names another model (e.g. a checkpoint under /models), then run the command.
set -e
if [ -z "${Q8CHAT_MODEL:-}" ] && [ -f /opt/q8chat/smollm2-int8/manifest.json ]; then
    export Q8CHAT_MODEL=/opt/q8chat/smollm2-int8
fi
exec "$@"
