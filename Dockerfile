# The raypack image for Kubernetes (k8s/*.yaml): the pinned Ray image with raypack installed on top under
# constraints.txt, the same install cluster.yaml's setup_commands do on every VM. The repo sits at
# /home/ray/raypack (the RayJobs' entrypoints name its jobs/ files there). From the repo root:
#   docker build -t REGISTRY/raypack:$(git rev-parse --short HEAD) . && docker push REGISTRY/raypack:...
# (jobs/CLUSTER.md, "Kubernetes"). A code or job-file change needs a new image and tag.
FROM rayproject/ray:2.60.0-py311-gpu

WORKDIR /home/ray/raypack
COPY --chown=ray:users . .
# ray==2.60.0 matches the image; torch==2.13.0 from PyPI on Linux x86 is its CUDA build. paper-eval: lm-eval's
# IFEval and MATH dependencies (eval.preset=paper); embed: pack.group_backend=embedding. flash-attn (the gpu extra)
# is left out as in cluster.yaml: it compiles against torch unless a wheel matches torch 2.13; raypack uses sdpa.
RUN pip install -q --no-cache-dir -c constraints.txt -e '.[paper-eval,embed]'
