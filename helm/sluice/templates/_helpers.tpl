{{/* Names and labels. */}}
{{- define "sluice.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "sluice.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
app.kubernetes.io/name: {{ .Chart.Name }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end -}}

{{- define "sluice.selector" -}}
app.kubernetes.io/name: {{ .Chart.Name }}
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
{{- $group := index $c (index $path 0) (index $path 1) -}}
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
# Rendered by the Sluice chart from .Values.config. Secrets come from the environment.
{{- range $section := keys $cfg | sortAlpha }}

[{{ $section }}]
{{- range $k := keys (get $cfg $section) | sortAlpha }}
{{ toJson $k }} = {{ include "sluice.tomlValue" (get (get $cfg $section) $k) }}
{{- end }}
{{- end }}
{{- end -}}
