"""Verifies one webhook request with the `standardwebhooks` package (PyPI), as a receiver
written by a third party would. Input on stdin: {"secret", "body", "headers"}. Exit 0 when
the signature verifies, 1 with the library's error otherwise."""
import json
import sys

from standardwebhooks.webhooks import Webhook

request = json.load(sys.stdin)
try:
    Webhook(request["secret"]).verify(request["body"], request["headers"])
except Exception as e:  # the library raises WebhookVerificationError
    print(f"{type(e).__name__}: {e}")
    sys.exit(1)
print("ok")
