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

{{- define "outbox-relay.image" -}}
{{- printf "%s:%s" .Values.image.repository (.Values.image.tag | default .Chart.AppVersion) }}
{{- end }}

{{/*
Checks the values; renders nothing. Fails on settings the chart owns, keys that are not
RELAY_ settings, passwords in env, a missing Secret and a grace period too short to drain.
*/}}
{{- define "outbox-relay.validate" -}}
{{- $owned := list "RELAY_HTTP__PORT" "RELAY_WAKEUP__ENABLED" "RELAY_WAKEUP__PORT" "RELAY_SECRETS_DIR" }}
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
{{- range $key, $value := .Values.env }}
- name: {{ $key }}
  value: {{ $value | toString | quote }}
{{- end }}
{{- with .Values.extraEnv }}
{{ toYaml . }}
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
{{- end }}

{{- define "outbox-relay.volumeMounts" -}}
- name: secrets
  mountPath: {{ .Values.secrets.mountPath }}
  readOnly: true
- name: tmp
  mountPath: /tmp
{{- end }}
