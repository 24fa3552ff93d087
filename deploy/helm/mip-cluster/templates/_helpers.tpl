{{/* Names, labels and the values derived from several settings (worker config, Redis URL, ports). */}}

{{- define "mip.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "mip.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- $name := default .Chart.Name .Values.nameOverride -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{- define "mip.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "mip.labels" -}}
helm.sh/chart: {{ include "mip.chart" . }}
app.kubernetes.io/name: {{ include "mip.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: mip-cluster
{{- end -}}

{{/* Selector labels of one component: include "mip.selectorLabels" (dict "ctx" $ "component" "worker") */}}
{{- define "mip.selectorLabels" -}}
app.kubernetes.io/name: {{ include "mip.name" .ctx }}
app.kubernetes.io/instance: {{ .ctx.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end -}}

{{- define "mip.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "mip.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- default "default" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{- define "mip.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) -}}
{{- end -}}

{{- define "mip.workerImage" -}}
{{- $repo := default .Values.image.repository .Values.worker.image.repository -}}
{{- $tag := default (default .Chart.AppVersion .Values.image.tag) .Values.worker.image.tag -}}
{{- printf "%s:%s" $repo $tag -}}
{{- end -}}

{{- define "mip.coordinatorName" -}}{{ include "mip.fullname" . }}-coordinator{{- end -}}
{{- define "mip.workerName" -}}{{ include "mip.fullname" . }}-worker{{- end -}}
{{- define "mip.workerHeadless" -}}{{ include "mip.fullname" . }}-worker-headless{{- end -}}
{{- define "mip.redisName" -}}{{ include "mip.fullname" . }}-redis{{- end -}}

{{/* The Redis URL every component uses: the bundled one, else redis.externalUrl (may be empty: no shared tier). */}}
{{- define "mip.redisUrl" -}}
{{- if .Values.redis.bundled.enabled -}}
{{- printf "redis://%s:6379/0" (include "mip.redisName" .) -}}
{{- else -}}
{{- .Values.redis.externalUrl -}}
{{- end -}}
{{- end -}}

{{/* The port of telemetry.metrics_listen ("host:port"); empty when metrics are off. */}}
{{- define "mip.metricsPort" -}}
{{- $listen := .Values.worker.config.telemetry.metrics_listen | default "" -}}
{{- if $listen -}}{{- splitList ":" $listen | last -}}{{- end -}}
{{- end -}}

{{/* The worker configuration file: worker.config with the chart-owned fields filled in, as YAML. */}}
{{- define "mip.workerConfig" -}}
{{- $c := deepCopy .Values.worker.config -}}
{{- $server := $c.server | default dict -}}
{{- if not $server.listen -}}{{- $_ := set $server "listen" (printf "0.0.0.0:%v" .Values.worker.port) -}}{{- end -}}
{{- if .Values.tls.enabled -}}
{{- $tls := dict "cert" (printf "%s/tls.crt" .Values.tls.mountPath) "key" (printf "%s/tls.key" .Values.tls.mountPath) "client_ca" "" -}}
{{- if .Values.tls.mutualTls -}}{{- $_ := set $tls "client_ca" (printf "%s/ca.crt" .Values.tls.mountPath) -}}{{- end -}}
{{- $_ := set $server "tls" $tls -}}
{{- end -}}
{{- $_ := set $c "server" $server -}}
{{- $redis := $c.redis | default dict -}}
{{- if not $redis.url -}}{{- $_ := set $redis "url" (include "mip.redisUrl" .) -}}{{- end -}}
{{- $_ := set $c "redis" $redis -}}
{{- $tel := $c.telemetry | default dict -}}
{{- if and (not $tel.otlp_endpoint) .Values.otel.endpoint -}}
{{- $_ := set $tel "otlp_endpoint" .Values.otel.endpoint -}}
{{- $_ := set $tel "sample_ratio" .Values.otel.sampleRatio -}}
{{- end -}}
{{- $_ := set $c "telemetry" $tel -}}
{{- toYaml $c -}}
{{- end -}}

{{/* The name the coordinator verifies on the workers' certificates (it dials pod IPs). */}}
{{- define "mip.workerTlsDomain" -}}
{{- default (printf "%s.%s.svc" (include "mip.workerHeadless" .) .Release.Namespace) .Values.tls.workerDomain -}}
{{- end -}}

{{/* The coordinator configuration file: the chart-owned fields, with coordinator.config merged over them, as YAML. */}}
{{- define "mip.coordinatorConfig" -}}
{{- $v := .Values.coordinator -}}
{{- $server := dict "listen" (printf "0.0.0.0:%v" $v.port) -}}
{{- with .Values.worker.config.server.max_message_bytes -}}{{- $_ := set $server "max_message_bytes" . -}}{{- end -}}
{{- if $v.tls.enabled -}}
{{- $tls := dict "cert" (printf "%s/tls.crt" $v.tls.mountPath) "key" (printf "%s/tls.key" $v.tls.mountPath) -}}
{{- if $v.tls.clientCa -}}{{- $_ := set $tls "client_ca" (printf "%s/ca.crt" $v.tls.mountPath) -}}{{- end -}}
{{- $_ := set $server "tls" $tls -}}
{{- end -}}
{{- $c := dict "server" $server -}}
{{- /* The coordinator admits exactly what the workers do: the same request limits. */ -}}
{{- with .Values.worker.config.limits -}}{{- $_ := set $c "limits" (deepCopy .) -}}{{- end -}}
{{- $redisUrl := include "mip.redisUrl" . -}}
{{- if $redisUrl -}}{{- $_ := set $c "redis" (dict "url" $redisUrl) -}}{{- end -}}
{{- $_ := set $c "coordinator" (dict "workers_dns" (printf "%s:%v" (include "mip.workerHeadless" .) .Values.worker.port)) -}}
{{- if .Values.tls.enabled -}}
{{- $wt := dict "ca" (printf "%s/ca.crt" .Values.tls.mountPath) "domain" (include "mip.workerTlsDomain" .) -}}
{{- if .Values.tls.mutualTls -}}
{{- $_ := set $wt "cert" (printf "%s/tls.crt" .Values.tls.mountPath) -}}
{{- $_ := set $wt "key" (printf "%s/tls.key" .Values.tls.mountPath) -}}
{{- end -}}
{{- $_ := set $c "worker_tls" $wt -}}
{{- end -}}
{{- if $v.auth.existingSecret -}}
{{- $_ := set $c "auth" (dict "tokens_file" (printf "%s/%s" $v.auth.mountPath $v.auth.key)) -}}
{{- end -}}
{{- $tel := dict -}}
{{- if .Values.otel.endpoint -}}
{{- $_ := set $tel "otlp_endpoint" .Values.otel.endpoint -}}
{{- $_ := set $tel "sample_ratio" .Values.otel.sampleRatio -}}
{{- end -}}
{{- if $v.metricsPort -}}{{- $_ := set $tel "metrics_listen" (printf "0.0.0.0:%v" $v.metricsPort) -}}{{- end -}}
{{- if $tel -}}{{- $_ := set $c "telemetry" $tel -}}{{- end -}}
{{- toYaml (mergeOverwrite $c (deepCopy ($v.config | default dict))) -}}
{{- end -}}

{{/* The port of the coordinator's telemetry.metrics_listen (after coordinator.config); empty when metrics are off. */}}
{{- define "mip.coordinatorMetricsPort" -}}
{{- $tel := (include "mip.coordinatorConfig" . | fromYaml).telemetry | default dict -}}
{{- $listen := $tel.metrics_listen | default "" -}}
{{- if $listen -}}{{- splitList ":" $listen | last -}}{{- end -}}
{{- end -}}
