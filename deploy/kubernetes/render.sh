#!/bin/sh
# Regenerates deploy/kubernetes/{deployment,migrate-job}.yaml from the chart (needs helm).
# Run from the repository root: sh deploy/kubernetes/render.sh
# Uses $HELM if set, else the pinned helm of deploy/kubernetes/get-helm.sh (installed if needed).
set -eu
HELM="${HELM:-$(sh deploy/kubernetes/get-helm.sh)}"
strip() { sed -e '/helm.sh\/chart:/d' -e '/app.kubernetes.io\/managed-by:/d' -e '/helm.sh\/hook/d' -e '/^  annotations:$/d' -e '/^# Source:/d'; }
{
  cat <<'HDR'
# outbox-relay as plain Kubernetes manifests, for clusters without Helm.
# Rendered from helm/outbox-relay with its default values (release name outbox-relay), Helm's
# own labels removed:
#   helm template outbox-relay helm/outbox-relay --namespace outbox-relay --set tests.enabled=false
# Before applying, create the Secret with the database password (never put it here):
#   kubectl -n outbox-relay create secret generic outbox-relay-db --from-literal=db-password='...'
# then edit the RELAY_* values below (see relay/config.py) and run
#   kubectl -n outbox-relay apply -f deploy/kubernetes/deployment.yaml
# Keep terminationGracePeriodSeconds above RELAY_WORKER__SHUTDOWN_TIMEOUT_S.
HDR
  "$HELM" template outbox-relay helm/outbox-relay --namespace outbox-relay --set tests.enabled=false | strip
} > deploy/kubernetes/deployment.yaml
{
  cat <<'HDR'
# One-off `relay migrate` (idempotent) as a plain Job; the chart runs the same Job as a hook
# with migrate.enabled=true. Apply it before the Deployment, and again before rolling out each
# new version (the new version's schema changes go in first; the old relays keep running):
#   kubectl -n outbox-relay delete job outbox-relay-migrate --ignore-not-found
#   kubectl -n outbox-relay apply -f deploy/kubernetes/migrate-job.yaml
#   kubectl -n outbox-relay wait --for=condition=complete job/outbox-relay-migrate --timeout=300s
HDR
  "$HELM" template outbox-relay helm/outbox-relay --namespace outbox-relay --set migrate.enabled=true \
    --show-only templates/migrate-job.yaml | strip
} > deploy/kubernetes/migrate-job.yaml
