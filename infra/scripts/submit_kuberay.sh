#!/usr/bin/env bash
# Submit jobs.compress to Kubernetes through KubeRay.
#   infra/scripts/submit_kuberay.sh once      create one RayJob from infra/kuberay/rayjob-compress.yaml
#   infra/scripts/submit_kuberay.sh nightly   install the nightly CronJob (and refresh its RayJob copy)
# Environment: NAMESPACE (default: kubectl's current namespace). Needs S3 access for the Ray pods: the
# ServiceAccount atr-ray with IRSA or EKS Pod Identity (infra/kuberay/serviceaccount.yaml), or the Secret
# atr-aws-credentials.
set -euo pipefail
cd "$(dirname "$0")/../.."

mode="${1:-}"
kube=(kubectl)
[[ -n "${NAMESPACE:-}" ]] && kube+=(--namespace "$NAMESPACE")

if ! "${kube[@]}" get serviceaccount atr-ray >/dev/null 2>&1; then
  echo "missing ServiceAccount atr-ray: kubectl apply -f infra/kuberay/serviceaccount.yaml (docs/operations.md, Credentials)" >&2
  exit 2
fi
if ! "${kube[@]}" get secret atr-aws-credentials >/dev/null 2>&1 \
   && [[ -z "$("${kube[@]}" get serviceaccount atr-ray -o 'jsonpath={.metadata.annotations.eks\.amazonaws\.com/role-arn}' 2>/dev/null)" ]]; then
  echo "note: no Secret atr-aws-credentials and no IRSA role on atr-ray; S3 access must come from EKS Pod Identity" >&2
fi

case "$mode" in
  once)
    rayjob=$("${kube[@]}" create -f infra/kuberay/rayjob-compress.yaml -o name)
    name="${rayjob#*/}"
    echo "created $rayjob"
    echo "status:  ${kube[*]} get rayjob $name -w"
    echo "logs:    ${kube[*]} logs -f job/$name   (the last line is the summary JSON)"
    ;;
  nightly)
    "${kube[@]}" create configmap atr-rayjob-compress \
      --from-file=rayjob.yaml=infra/kuberay/rayjob-compress.yaml --dry-run=client -o yaml \
      | "${kube[@]}" apply -f -
    "${kube[@]}" apply -f infra/kuberay/cronjob-nightly.yaml
    echo "nightly run installed; run it now with:"
    echo "  ${kube[*]} create job --from=cronjob/atr-compress-nightly atr-compress-manual-$(date -u +%s)"
    ;;
  *)
    echo "usage: $0 once|nightly" >&2
    exit 2
    ;;
esac
