{{/* Names and labels. */}}
{{- define "sluice.name" -}}
{{- .Values.nameOverride | default .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "sluice.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- $name := include "sluice.name" . -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{/* A consumer group's name: prefixed with the release, so two releases never share one. */}}
{{- define "sluice.group" -}}
{{- $prefix := printf "%s-" (.root.Values.groupPrefix.prefix | default .root.Release.Name) -}}
{{- if and .root.Values.groupPrefix.enabled (not (hasPrefix $prefix .group)) -}}
{{- printf "%s%s" $prefix .group -}}
{{- else -}}
{{- .group -}}
{{- end -}}
{{- end -}}

{{- define "sluice.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
app.kubernetes.io/name: {{ include "sluice.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end -}}

{{- define "sluice.selector" -}}
app.kubernetes.io/name: {{ include "sluice.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "sluice.image" -}}
{{ .Values.image.repository }}:{{ .Values.image.tag | default .Chart.AppVersion }}
{{- end -}}

{{- define "sluice.secretName" -}}
{{- .Values.secrets.existingSecret | default (printf "%s-secrets" (include "sluice.fullname" .)) -}}
{{- end -}}

{{- define "sluice.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- .Values.serviceAccount.name | default (include "sluice.fullname" .) -}}
{{- else -}}
{{- .Values.serviceAccount.name | default "default" -}}
{{- end -}}
{{- end -}}

{{/*
The enabled components as a JSON list: name, the `sluice` arguments, their values, and
for consumers the group and topic their lag is measured on.
*/}}
{{- define "sluice.components" -}}
{{- $c := .Values.config -}}
{{- $t := $c.topics -}}
{{- $list := list -}}
{{- if .Values.ingest.enabled -}}
{{- $list = append $list (dict "name" "ingest" "args" (list "ingest") "values" .Values.ingest "consumer" false) -}}
{{- end -}}
{{- range $name, $v := .Values.components -}}
{{- if $v.enabled -}}
{{- $path := splitList "." $v.group -}}
{{- $group := include "sluice.group" (dict "root" $ "group" (index $c (index $path 0) (index $path 1))) -}}
{{- $list = append $list (dict "name" $name "args" (list $v.kind $v.name) "values" $v "consumer" true "group" $group "topic" (index $t $v.topic)) -}}
{{- end -}}
{{- end -}}
{{- toJson $list -}}
{{- end -}}

{{/*
One TOML value. Helm reads numbers in values as floats; whole ones are written as
integers, since Sluice's integer settings reject 6.0.
*/}}
{{- define "sluice.tomlValue" -}}
{{- if kindIs "float64" . -}}
{{- if eq (float64 (int64 .)) . -}}{{ int64 . }}{{- else -}}{{ . }}{{- end -}}
{{- else if or (kindIs "int" .) (kindIs "int64" .) (kindIs "bool" .) -}}
{{- . -}}
{{- else if kindIs "string" . -}}
{{- toJson . -}}
{{- else if kindIs "slice" . -}}
[{{ range $i, $v := . }}{{ if $i }}, {{ end }}{{ include "sluice.tomlValue" $v }}{{ end }}]
{{- else if kindIs "map" . -}}
{ {{- range $i, $k := keys . | sortAlpha }}{{ if $i }}, {{ end }}{{ toJson $k }} = {{ include "sluice.tomlValue" (get $ $k) }}{{ end -}} }
{{- else -}}
{{- fail (printf "config: cannot write %v (%s) as TOML" . (kindOf .)) -}}
{{- end -}}
{{- end -}}

{{/* sluice.toml: `config` plus the listen addresses of the pods' ports. */}}
{{- define "sluice.config" -}}
{{- $cfg := deepCopy .Values.config -}}
{{- $ingest := get $cfg "ingest" | default dict -}}
{{- $_ := set $ingest "listen" (printf "0.0.0.0:%d" (int .Values.ports.http)) -}}
{{- $_ := set $cfg "ingest" $ingest -}}
{{- $_ := set $cfg "metrics" (dict "listen" (printf "0.0.0.0:%d" (int .Values.ports.metrics))) -}}
{{- /* Consumer groups as the components list names them (release-prefixed). */ -}}
{{- range $name, $v := .Values.components -}}
{{- $path := splitList "." $v.group -}}
{{- $section := get $cfg (index $path 0) | default dict -}}
{{- $_ := set $section (index $path 1) (include "sluice.group" (dict "root" $ "group" (get $section (index $path 1)))) -}}
{{- $_ := set $cfg (index $path 0) $section -}}
{{- end -}}
{{- /* The Kafka CA from its Secret, mounted where the config says. */ -}}
{{- if .Values.kafkaCa.secretName -}}
{{- $kafka := get $cfg "kafka" -}}
{{- $security := get $kafka "security" | default dict -}}
{{- $_ := set $security "ca_file" (printf "/etc/sluice-kafka-ca/%s" .Values.kafkaCa.key) -}}
{{- $_ := set $kafka "security" $security -}}
{{- end -}}
# Rendered by the Sluice chart from .Values.config. Secrets come from the environment.
{{- range $section := keys $cfg | sortAlpha }}

[{{ $section }}]
{{- range $k := keys (get $cfg $section) | sortAlpha }}
{{ toJson $k }} = {{ include "sluice.tomlValue" (get (get $cfg $section) $k) }}
{{- end }}
{{- end }}
{{- end -}}

{{/*
A container's environment: the Secret's keys its component needs (and no others), the
log settings, extra env and envFrom.
*/}}
{{- define "sluice.containerEnv" -}}
{{- $d := .root.Values.defaults -}}
{{- $secret := include "sluice.secretName" .root -}}
{{- $needs := .v.needs | default list -}}
{{- $keys := list "SLUICE__KAFKA__SECURITY__USERNAME" "SLUICE__KAFKA__SECURITY__PASSWORD" -}}
{{- if has "registry" $needs -}}
{{- $keys = concat $keys (list "SLUICE__SCHEMAS__REGISTRY_USERNAME" "SLUICE__SCHEMAS__REGISTRY_PASSWORD") -}}
{{- end -}}
{{- if has "timescale" $needs -}}
{{- $keys = append $keys "SLUICE__TIMESCALE__URL" -}}
{{- end -}}
{{- if .ingest -}}
{{- $keys = append $keys "SLUICE__INGEST__API_KEYS" -}}
{{- else if not .root.Values.secrets.existingSecret -}}
{{- $keys = concat $keys (keys .root.Values.secrets.env | sortAlpha) -}}
{{- end -}}
{{- with (concat ($d.extraEnvFrom | default list) (.v.extraEnvFrom | default list)) }}
envFrom:
  {{- toYaml . | nindent 2 }}
{{- end }}
env:
  {{- range $keys }}
  - name: {{ . }}
    valueFrom:
      secretKeyRef: {name: {{ $secret }}, key: {{ . }}, optional: true}
  {{- end }}
  - name: RUST_LOG
    value: {{ .v.logLevel | default $d.logLevel | default "info" | quote }}
  - name: SLUICE__LOG__FORMAT
    value: {{ .v.logFormat | default $d.logFormat | default "json" | quote }}
  {{- with (concat ($d.extraEnv | default list) (.v.extraEnv | default list)) }}
  {{- toYaml . | nindent 2 }}
  {{- end }}
{{- end -}}

{{/* The database URL with `sslmode=require` unless it names a mode. */}}
{{- define "sluice.timescaleUrl" -}}
{{- $url := .Values.secrets.timescaleUrl -}}
{{- if contains "sslmode=" $url -}}
{{ $url }}
{{- else if contains "?" $url -}}
{{ $url }}&sslmode=require
{{- else -}}
{{ $url }}?sslmode=require
{{- end -}}
{{- end -}}

{{/*
Refuse placeholder or empty secrets unless allowInsecureDefaults (a local demo): an
install with `change-me` keys is open to anyone who read this chart.
*/}}
{{- define "sluice.refuseInsecureSecrets" -}}
{{- $s := .Values.secrets -}}
{{- if not (or .Values.allowInsecureDefaults $s.existingSecret) -}}
{{- $bad := list -}}
{{- if and .Values.ingest.enabled (empty $s.apiKeys) -}}
{{- $bad = append $bad "secrets.apiKeys is empty" -}}
{{- end -}}
{{- range $s.apiKeys -}}
{{- if or (empty .key) (contains "change-me" .key) -}}
{{- $bad = append $bad (printf "secrets.apiKeys: the key of tenant %s is %q" .tenant .key) -}}
{{- end -}}
{{- end -}}
{{- if or (empty $s.timescaleUrl) (contains "change-me" $s.timescaleUrl) -}}
{{- $bad = append $bad "secrets.timescaleUrl holds no password or the placeholder change-me" -}}
{{- end -}}
{{- range $user := list "kafka" "registry" -}}
{{- $name := get $s (printf "%sUsername" $user) -}}
{{- $password := get $s (printf "%sPassword" $user) -}}
{{- if and $name (or (empty $password) (contains "change-me" $password)) -}}
{{- $bad = append $bad (printf "secrets.%sPassword is empty or change-me" $user) -}}
{{- end -}}
{{- end -}}
{{- if $bad -}}
{{- fail (printf "refusing insecure secrets: %s. Set real ones, or existingSecret, or --set allowInsecureDefaults=true for a local demo." (join "; " $bad)) -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{/* A container's mounts: the config, the Kafka CA, extra mounts. */}}
{{- define "sluice.volumeMounts" -}}
{{- $d := .root.Values.defaults -}}
volumeMounts:
  - name: config
    mountPath: /etc/sluice
    readOnly: true
  {{- if .root.Values.kafkaCa.secretName }}
  - name: kafka-ca
    mountPath: /etc/sluice-kafka-ca
    readOnly: true
  {{- end }}
  {{- with (concat ($d.extraVolumeMounts | default list) (.v.extraVolumeMounts | default list)) }}
  {{- toYaml . | nindent 2 }}
  {{- end }}
{{- end -}}
