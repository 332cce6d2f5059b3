{{/* Chart name, truncated to the DNS label limit. */}}
{{- define "outbox-relay.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Fully qualified app name. */}}
{{- define "outbox-relay.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{- define "outbox-relay.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Labels of every object. */}}
{{- define "outbox-relay.labels" -}}
helm.sh/chart: {{ include "outbox-relay.chart" . }}
app.kubernetes.io/name: {{ include "outbox-relay.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Values.image.tag | default .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{/* Selector of the relay pods; the migration Job's pods have another component. */}}
{{- define "outbox-relay.selectorLabels" -}}
app.kubernetes.io/name: {{ include "outbox-relay.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: relay
{{- end }}

{{- define "outbox-relay.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "outbox-relay.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/* The image by tag, or by digest when image.digest is set. */}}
{{- define "outbox-relay.image" -}}
{{- if .Values.image.digest }}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest }}
{{- else }}
{{- printf "%s:%s" .Values.image.repository (.Values.image.tag | default .Chart.AppVersion) }}
{{- end }}
{{- end }}

{{/*
Checks the values; renders nothing. Fails on settings the chart owns, keys that are not
RELAY_ settings, passwords in env, a missing Secret and a grace period too short to drain.
*/}}
{{- define "outbox-relay.validate" -}}
{{- $owned := list "RELAY_HTTP__PORT" "RELAY_WAKEUP__ENABLED" "RELAY_WAKEUP__HOST" "RELAY_WAKEUP__PORT" "RELAY_SECRETS_DIR" }}
{{- range $key, $value := .Values.env }}
{{- if not (regexMatch "^RELAY_[A-Z0-9]+__[A-Z0-9_]+$" $key) }}
{{- fail (printf "env.%s: keys must be relay settings named RELAY_<GROUP>__<FIELD> (use extraEnv for others)" $key) }}
{{- end }}
{{- if has $key $owned }}
{{- fail (printf "env.%s is set by the chart (see ports, wakeup, secrets)" $key) }}
{{- end }}
{{- if regexMatch "PASSWORD" $key }}
{{- fail (printf "env.%s: passwords go into the existing Secret (secrets.files), never into the manifest" $key) }}
{{- end }}
{{- end }}
{{- if not .Values.secrets.existingSecret }}
{{- fail "secrets.existingSecret is required: the name of a Secret holding the database password" }}
{{- end }}
{{- if .Values.networkPolicy.enabled }}
{{- range $target := list "database" "kafka" }}
{{- $egress := get $.Values.networkPolicy.egress $target }}
{{- if not (or $egress.cidrs $egress.peers) }}
{{- fail (printf "networkPolicy.egress.%s: give cidrs or peers (the relay must reach it)" $target) }}
{{- end }}
{{- end }}
{{- if and .Values.wakeup.enabled (not .Values.networkPolicy.ingress.wakeupFrom) }}
{{- fail "networkPolicy.ingress.wakeupFrom: give the writers' peers (wakeup.enabled), or wake-ups are dropped" }}
{{- end }}
{{- end }}
{{- $drain := float64 (default "20" (get .Values.env "RELAY_WORKER__SHUTDOWN_TIMEOUT_S")) }}
{{- if le (float64 .Values.terminationGracePeriodSeconds) $drain }}
{{- fail (printf "terminationGracePeriodSeconds (%v) must exceed RELAY_WORKER__SHUTDOWN_TIMEOUT_S (%v)" .Values.terminationGracePeriodSeconds $drain) }}
{{- end }}
{{- end }}

{{/* Container env: the RELAY_ settings of values.env plus the ones the chart owns. */}}
{{- define "outbox-relay.env" -}}
- name: RELAY_SECRETS_DIR
  value: {{ .Values.secrets.mountPath | quote }}
- name: RELAY_HTTP__PORT
  value: {{ .Values.ports.http | quote }}
- name: RELAY_WAKEUP__ENABLED
  value: {{ .Values.wakeup.enabled | quote }}
- name: RELAY_WAKEUP__PORT
  value: {{ .Values.wakeup.port | quote }}
{{- if .Values.wakeup.enabled }}
{{- /* writers in other pods send to the Service: listen on the pod IP, not loopback */}}
- name: RELAY_WAKEUP__HOST
  value: "0.0.0.0"
{{- end }}
{{- range $key, $value := .Values.env }}
{{- /* Helm reads numbers of values files as float64: 16777216 would print as 1.6777216e+07. */}}
{{- if and (kindIs "float64" $value) (eq $value (float64 (int64 $value))) }}
{{- $value = int64 $value }}
{{- end }}
- name: {{ $key }}
  value: {{ $value | toString | quote }}
{{- end }}
{{- with .Values.extraEnv }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{/*
The container's env and envFrom keys (the same in the relay, migrate and test containers);
include it with nindent set to the container's indentation.
*/}}
{{- define "outbox-relay.containerEnv" -}}
env:
  {{- include "outbox-relay.env" . | nindent 2 }}
{{- with .Values.extraEnvFrom }}
envFrom:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- end }}

{{/* Secret files and a writable /tmp (the root filesystem is read-only). */}}
{{- define "outbox-relay.volumes" -}}
- name: secrets
  secret:
    secretName: {{ .Values.secrets.existingSecret }}
    defaultMode: 0440
    items:
    {{- range $file, $key := .Values.secrets.files }}
      - key: {{ $key }}
        path: {{ $file }}
    {{- end }}
- name: tmp
  emptyDir:
    sizeLimit: 16Mi
{{- with .Values.extraVolumes }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{- define "outbox-relay.volumeMounts" -}}
- name: secrets
  mountPath: {{ .Values.secrets.mountPath }}
  readOnly: true
- name: tmp
  mountPath: /tmp
{{- with .Values.extraVolumeMounts }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{/*
Topology spread constraints; one without labelSelector selects this release's relay pods.
*/}}
{{- define "outbox-relay.topologySpreadConstraints" -}}
{{- range .Values.topologySpreadConstraints }}
{{- $constraint := deepCopy . }}
{{- if not (hasKey $constraint "labelSelector") }}
{{- $_ := set $constraint "labelSelector" (dict "matchLabels" (include "outbox-relay.selectorLabels" $ | fromYaml)) }}
{{- end }}
- {{ toYaml $constraint | nindent 2 | trim }}
{{- end }}
{{- end }}
