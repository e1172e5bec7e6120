"""Run as a rank under kimad.emulate: print, as one JSON line, what this rank sees of its node."""

import json
import os
import socket

keys = sorted(k for k in os.environ if k.startswith(("HOROVOD_", "NCCL_SOCKET")))
print(json.dumps({
    "env": {k: os.environ[k] for k in keys},
    "hostname_address": socket.gethostbyname(socket.gethostname()),
}), flush=True)
