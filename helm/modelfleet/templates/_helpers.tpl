{{/* The release's full name, trimmed to 63 characters. */}}
{{- define "modelfleet.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "modelfleet.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "modelfleet.selectorLabels" -}}
app.kubernetes.io/name: {{ .Chart.Name }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "modelfleet.labels" -}}
{{ include "modelfleet.selectorLabels" . }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
helm.sh/chart: {{ include "modelfleet.chart" . }}
{{- end -}}

{{- define "modelfleet.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "modelfleet.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- default "default" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{- define "modelfleet.image" -}}
{{- printf "%s:%s" .image.repository (default .appVersion .image.tag) -}}
{{- end -}}

{{/* PriorityClass names of serving and build pods: given ones, else the chart's own when it makes them. */}}
{{- define "modelfleet.servingPriorityClass" -}}
{{- .Values.priorityClasses.serving.name | default (ternary (printf "%s-serving" (include "modelfleet.fullname" .)) "" .Values.priorityClasses.create) -}}
{{- end -}}

{{- define "modelfleet.buildPriorityClass" -}}
{{- .Values.priorityClasses.build.name | default (ternary (printf "%s-build" (include "modelfleet.fullname" .)) "" .Values.priorityClasses.create) -}}
{{- end -}}

{{/* The Lease the operator's replicas elect their leader on, in the release's namespace. */}}
{{- define "modelfleet.leaseName" -}}
{{- printf "%s-operator" (include "modelfleet.fullname" .) | trunc 63 | trimSuffix "-" -}}
{{- end -}}
