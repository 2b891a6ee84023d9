"""The environment an evaluation that runs model-written code gets: the evaluator's, without credentials.

lm-eval scores HumanEval by running the code the model wrote (Hugging Face
`evaluate`'s code_eval, in processes forked from the evaluating one), unsandboxed.
So with eval.allow_code_execution on, raypack.eval.harness runs the evaluation in a
fresh child process (not a fork: nothing of the parent's memory) whose environment
is `scrubbed_env(os.environ, ...)`:

- removed: every variable of a cloud, hub or tracking service (AWS_*, AZURE_*,
  GOOGLE_*, GCP_*, GCLOUD_*, CLOUDSDK_*, MLFLOW_*, WANDB_*, HF_TOKEN, ...), every
  variable whose name holds TOKEN, SECRET, PASSWORD, PASSWD, CREDENTIAL, PRIVATE,
  AUTH or a KEY part (AWS_SECRET_ACCESS_KEY, OPENAI_API_KEY, GITHUB_TOKEN, PGPASSWORD),
  the ssh agent's socket, KUBECONFIG and NETRC, and every variable whose value is a
  URL with a password in it (https://user:pass@host);
- the credential files the libraries find by default are hidden: HOME is an empty
  folder (no ~/.aws, ~/.config/gcloud, ~/.azure, ~/.netrc, ~/.ssh, ~/.kube,
  ~/.git-credentials, ~/.docker, ~/.mlflow), the AWS, gcloud and Azure files and
  the Hugging Face token point into it, and AWS SDKs do not ask the instance
  metadata service; the caches stay where they were (XDG_CACHE_HOME, so the
  datasets lm-eval downloaded are found) and so do user-installed packages
  (PYTHONUSERBASE).

What this does not do (docs/cluster.md, "What raypack trusts"): the code still runs
as the same user with the same network and files. It can read a credential file by
its absolute path, reach the cloud's metadata service (an instance role's
credentials) or any host. Pure: no lm_eval, no ray.

    >>> env, removed = scrubbed_env({"PATH": "/bin", "AWS_SECRET_ACCESS_KEY": "x", "HOME": "/root"},
    ...                             home="/tmp/e", cache_home="/root/.cache", user_base="/root/.local")
    >>> removed, env["HOME"], "AWS_SECRET_ACCESS_KEY" in env
    (['AWS_SECRET_ACCESS_KEY'], '/tmp/e', False)
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping

# Whole families: a cloud's, a hub's or a tracking service's settings may carry credentials under any name.
SECRET_PREFIXES = ("AWS_", "AZURE_", "ARM_", "GOOGLE_", "GCP_", "GCLOUD_", "CLOUDSDK_", "MLFLOW_", "WANDB_",
                   "DATABRICKS_", "HUGGING_FACE_HUB_", "OPENAI_", "ANTHROPIC_", "VAULT_")
# Any name holding one of these.
SECRET_WORDS = ("TOKEN", "SECRET", "PASSWORD", "PASSWD", "CREDENTIAL", "PRIVATE", "AUTH", "APIKEY")
# Names whose `_`-separated parts include one of these (AWS_ACCESS_KEY_ID, HF_API_KEY; not KEYBOARD).
SECRET_PARTS = ("KEY", "KEYS", "PAT")
SECRET_NAMES = ("SSH_AUTH_SOCK", "KUBECONFIG", "NETRC", "GIT_ASKPASS", "SSH_ASKPASS", "DOCKER_CONFIG",
                "HF_TOKEN_PATH")
# Names that hold a secret word but no secret.
KEEP_NAMES = ("TOKENIZERS_PARALLELISM",)
# A URL with a user and a password: https://user:secret@host, postgresql://u:p@db/x.
URL_PASSWORD = re.compile(r"[a-z][a-z0-9+.-]*://[^/\s:@]*:[^/\s@]+@", re.IGNORECASE)


def is_secret(name: str, value: str) -> bool:
    """Whether the variable goes: a credential by its name or its value.

    >>> [is_secret(n, v) for n, v in [("GITHUB_TOKEN", "x"), ("AWS_REGION", "us-east-1"),
    ...  ("OPENAI_API_KEY", "x"), ("HTTPS_PROXY", "http://u:p@proxy:3128"), ("HTTPS_PROXY", "http://proxy:3128"),
    ...  ("CUDA_VISIBLE_DEVICES", "0"), ("KEYBOARD", "us"), ("TOKENIZERS_PARALLELISM", "false")]]
    [True, True, True, True, False, False, False, False]
    """
    upper = name.upper()
    if upper in KEEP_NAMES:
        return False
    return (upper.startswith(SECRET_PREFIXES) or any(word in upper for word in SECRET_WORDS)
            or any(part in SECRET_PARTS for part in upper.split("_")) or upper in SECRET_NAMES
            or bool(URL_PASSWORD.search(value)))


def scrubbed_env(env: Mapping[str, str], home: str, cache_home: str,
                 user_base: str) -> tuple[dict[str, str], list[str]]:
    """`env` without credentials (is_secret), HOME set to `home` (an empty folder) and the credential files
    pointed into it; returns (the environment, the names removed, sorted).

    `cache_home` is the evaluator's cache folder (XDG_CACHE_HOME or ~/.cache), kept so
    the Hugging Face caches stay found; `user_base` its PYTHONUSERBASE (~/.local), so
    packages installed with pip --user still import.
    """
    removed = sorted(name for name, value in env.items() if is_secret(name, value))
    out = {name: value for name, value in env.items() if name not in removed}
    out.update({
        "HOME": home,
        "XDG_CONFIG_HOME": os.path.join(home, ".config"),
        "XDG_CACHE_HOME": cache_home,
        "PYTHONUSERBASE": user_base,
        "HF_TOKEN_PATH": os.path.join(home, "hf-token"),  # none there: huggingface_hub finds no token
        "AWS_SHARED_CREDENTIALS_FILE": os.path.join(home, "aws-credentials"),
        "AWS_CONFIG_FILE": os.path.join(home, "aws-config"),
        "AWS_EC2_METADATA_DISABLED": "true",  # SDKs do not fetch the instance role (the network still can)
        "CLOUDSDK_CONFIG": os.path.join(home, "gcloud"),  # gcloud and google-auth's default credentials
        "AZURE_CONFIG_DIR": os.path.join(home, "azure"),
    })
    return out, removed
