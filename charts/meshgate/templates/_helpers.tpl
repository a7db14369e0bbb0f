{{/*
Names and labels shared by every template.
*/}}

{{- define "meshgate.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
The release's base name: the release name alone when it already says "meshgate",
so `helm install meshgate` gives meshgate-ingressgateway, not meshgate-meshgate-...
*/}}
{{- define "meshgate.fullname" -}}
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

{{- define "meshgate.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
app.kubernetes.io/name: {{ include "meshgate.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: meshgate
{{- end }}

{{/*
Selector labels of one component. Called with (dict "root" $ "component" "ingressgateway").
The Istio-style labels (istio: ingressgateway) are left out on purpose: they may be
overridden in values, and a Deployment's selector cannot change after install.
*/}}
{{- define "meshgate.selectorLabels" -}}
app.kubernetes.io/name: {{ include "meshgate.name" .root }}
app.kubernetes.io/instance: {{ .root.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end }}

{{- define "meshgate.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "meshgate.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "meshgate.configMapName" -}}
{{- if .Values.existingConfigMap }}
{{- .Values.existingConfigMap }}
{{- else }}
{{- printf "%s-config" (include "meshgate.fullname" .) }}
{{- end }}
{{- end }}

{{- define "meshgate.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}

{{/*
The Redis URL the gateways get: the bundled Redis when enabled, else redisUrl.
*/}}
{{- define "meshgate.redisUrl" -}}
{{- if .Values.redis.enabled }}
{{- printf "redis://%s-redis.%s.svc:6379/0" (include "meshgate.fullname" .) .Release.Namespace }}
{{- else }}
{{- .Values.redisUrl }}
{{- end }}
{{- end }}

{{/*
The enabled gateways, as JSON {"items": [...]}: one entry per Deployment, holding
the values that may differ between the ingress and the egress gateway. The ingress
gateway takes the conventional top-level names (replicaCount, autoscaling, service,
...); the egress gateway has its own block and falls back to the top-level resources.
Templates read it with (include "meshgate.gateways" . | fromJson).items.
*/}}
{{- define "meshgate.gateways" -}}
{{- $fullname := include "meshgate.fullname" . }}
{{- $items := list }}
{{- if .Values.ingress.enabled }}
{{- $ingress := pick .Values "labels" "replicaCount" "autoscaling" "podDisruptionBudget" "service" "resources" "extraArgs" }}
{{- $items = append $items (merge (dict "component" "ingressgateway" "name" (printf "%s-ingressgateway" $fullname | trunc 63 | trimSuffix "-")) $ingress) }}
{{- end }}
{{- if .Values.egress.enabled }}
{{- $egress := omit .Values.egress "enabled" }}
{{- $items = append $items (merge (dict "component" "egressgateway" "name" (printf "%s-egressgateway" $fullname | trunc 63 | trimSuffix "-") "resources" (.Values.egress.resources | default .Values.resources)) $egress) }}
{{- end }}
{{- toJson (dict "items" $items) }}
{{- end }}
