{{/*
Labels.

Selector labels are `app.kubernetes.io/name: <release>-<component>` and nothing else, exactly as
in chart 0.1.0: a Deployment's selector is immutable, so changing it would make `helm upgrade`
fail, and the operator's PodDisruptionBudgets (switchyard/operator/autoscaling.py) select the
gateway and ext_proc pods by that one label. Every other standard label (instance, component,
version, managed-by, part-of) goes on the objects and the pod templates, never in a selector.
*/}}
{{- define "switchyard.fullname" -}}
{{- printf "%s-%s" .root.Release.Name .component | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "switchyard.selectorLabels" -}}
app.kubernetes.io/name: {{ include "switchyard.fullname" . }}
{{- end -}}

{{/* Labels of a component's objects and pods: call with (dict "root" $ "component" "gateway"). */}}
{{- define "switchyard.componentLabels" -}}
{{ include "switchyard.selectorLabels" . }}
app.kubernetes.io/instance: {{ .root.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{ include "switchyard.commonLabels" .root }}
{{- end -}}

{{/* Labels of objects that belong to no single component (RBAC, ...). */}}
{{- define "switchyard.labels" -}}
app.kubernetes.io/instance: {{ .Release.Name }}
{{ include "switchyard.commonLabels" . }}
{{- end -}}

{{- define "switchyard.commonLabels" -}}
app.kubernetes.io/part-of: switchyard
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end -}}

{{/* The switchyard image (operator, ext_proc). */}}
{{- define "switchyard.image" -}}
{{ .Values.image.repository }}:{{ .Values.image.tag | default .Chart.AppVersion }}
{{- end -}}

{{/* The xDS / config-stream address of the operator, as the data plane dials it. */}}
{{- define "switchyard.xdsHost" -}}
{{ include "switchyard.fullname" (dict "root" . "component" "xds") }}.{{ .Release.Namespace }}.svc
{{- end -}}

{{/*
Pod and container security contexts: non-root (uid/gid 65532, the images' user), read-only root
filesystem, no privilege escalation, every capability dropped, the runtime's default seccomp
profile. Writable scratch space is an emptyDir at /tmp.
*/}}
{{- define "switchyard.podSecurityContext" -}}
runAsNonRoot: true
runAsUser: 65532
runAsGroup: 65532
fsGroup: 65532
fsGroupChangePolicy: OnRootMismatch
seccompProfile: {type: RuntimeDefault}
{{- end -}}

{{- define "switchyard.containerSecurityContext" -}}
runAsNonRoot: true
runAsUser: 65532
runAsGroup: 65532
readOnlyRootFilesystem: true
allowPrivilegeEscalation: false
privileged: false
capabilities: {drop: [ALL]}
seccompProfile: {type: RuntimeDefault}
{{- end -}}

{{/* Scheduling and pull secrets of one component: (dict "root" $ "component" "gateway" "values" .Values.gateway). */}}
{{- define "switchyard.scheduling" -}}
{{- with .root.Values.imagePullSecrets }}
imagePullSecrets: {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .values.nodeSelector }}
nodeSelector: {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .values.tolerations }}
tolerations: {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .values.affinity }}
affinity: {{- toYaml . | nindent 2 }}
{{- end }}
{{- if .values.spreadAcrossNodes }}
# Soft: replicas go to different nodes when the scheduler can, so one node's loss or drain
# takes one replica (the PodDisruptionBudget then keeps the rest).
topologySpreadConstraints:
- maxSkew: 1
  topologyKey: kubernetes.io/hostname
  whenUnsatisfiable: ScheduleAnyway
  labelSelector:
    matchLabels: {{- include "switchyard.selectorLabels" (dict "root" .root "component" .component) | nindent 6 }}
  matchLabelKeys: [pod-template-hash]
{{- end }}
{{- end -}}

{{/* NetworkPolicy peers allowed to scrape metrics: pods in the namespaces metricsNamespaceSelector picks ({} = all). */}}
{{- define "switchyard.metricsPeers" -}}
- namespaceSelector: {{- toYaml .Values.networkPolicy.metricsNamespaceSelector | nindent 4 }}
{{- end -}}
{{- define "switchyard.dnsEgress" -}}
- ports: [{port: 53, protocol: UDP}, {port: 53, protocol: TCP}]
{{- end -}}

{{/*
Where the gateway and the ext_proc send traces: tracing.otlpEndpoint, else the chart's Jaeger
(jaeger.enabled), else nowhere ("": no tracing config at all).
*/}}
{{- define "switchyard.otlpEndpoint" -}}
{{- if .Values.tracing.otlpEndpoint -}}
{{ .Values.tracing.otlpEndpoint }}
{{- else if .Values.jaeger.enabled -}}
{{ include "switchyard.fullname" (dict "root" . "component" "jaeger") }}.{{ .Release.Namespace }}.svc:4317
{{- end -}}
{{- end -}}

{{/* Value checks the schema cannot express: ports that would collide inside one pod. */}}
{{- define "switchyard.validate" -}}
{{- $g := .Values.gateway -}}
{{- if or (eq (int $g.port) (int $g.healthPort)) (eq (int $g.port) (int $g.adminPort)) (eq (int $g.healthPort) (int $g.adminPort)) -}}
{{- fail (printf "gateway.port (%v), gateway.healthPort (%v) and gateway.adminPort (%v) must differ" $g.port $g.healthPort $g.adminPort) -}}
{{- end -}}
{{- $e := .Values.extproc -}}
{{- $last := add $e.port (sub (int $e.workers) 1) -}}
{{- if and (ge (int $e.metricsPort) (int $e.port)) (le (int $e.metricsPort) (int $last)) -}}
{{- fail (printf "extproc.metricsPort (%v) must not be one of the workers' ports %v-%v (extproc.port + worker)" $e.metricsPort $e.port $last) -}}
{{- end -}}
{{- $o := .Values.operator -}}
{{- if or (eq (int $o.xdsPort) (int $o.healthPort)) (eq (int $o.xdsPort) (int $o.metricsPort)) (eq (int $o.healthPort) (int $o.metricsPort)) -}}
{{- fail (printf "operator.xdsPort (%v), operator.healthPort (%v) and operator.metricsPort (%v) must differ" $o.xdsPort $o.healthPort $o.metricsPort) -}}
{{- end -}}
{{- end -}}

{{/*
mTLS (values tls): the Secret holding tls.crt, tls.key and ca.crt, where pods mount it, and the
DNS names its certificate carries (Envoy checks the first two: the ext_proc's and the xDS
Service's; the ext_proc's config client checks the xDS one).
*/}}
{{- define "switchyard.tlsSecret" -}}
{{- .Values.tls.existingSecret | default (include "switchyard.fullname" (dict "root" . "component" "tls")) -}}
{{- end -}}

{{- define "switchyard.tlsDir" -}}/etc/switchyard/tls{{- end -}}

{{- define "switchyard.extprocHost" -}}
{{ include "switchyard.fullname" (dict "root" . "component" "extproc") }}.{{ .Release.Namespace }}.svc
{{- end -}}

{{- define "switchyard.tlsDNSNames" -}}
- {{ include "switchyard.extprocHost" . }}
- {{ include "switchyard.xdsHost" . }}
- {{ include "switchyard.extprocHost" . }}.cluster.local
- {{ include "switchyard.xdsHost" . }}.cluster.local
{{- end -}}

{{/* The pod volume and the container mount of the certificate (read-only, group-readable). */}}
{{- define "switchyard.tlsVolume" -}}
{{- if .Values.tls.enabled }}
- name: tls
  secret: {secretName: {{ include "switchyard.tlsSecret" . }}, defaultMode: 0440}
{{- end }}
{{- end -}}

{{- define "switchyard.tlsMount" -}}
{{- if .Values.tls.enabled }}
- {name: tls, mountPath: {{ include "switchyard.tlsDir" . }}, readOnly: true}
{{- end }}
{{- end -}}

{{/*
Envoy's side (operator/envoy_tls.py builds the same): an upstream TLS context whose
certificate and CA come over SDS from the files sds-certificate.json and sds-ca.json in the
Envoy ConfigMap (/etc/envoy), checking the server's DNS name. Call with (dict "root" $ "host" NAME).
*/}}
{{- define "switchyard.envoyUpstreamMtls" -}}
{{- $sds := "{resource_api_version: V3, path_config_source: {path: /etc/envoy/%s, watched_directory: {path: /etc/envoy}}}" -}}
name: envoy.transport_sockets.tls
typed_config:
  "@type": type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext
  sni: {{ .host }}
  common_tls_context:
    alpn_protocols: [h2]
    tls_certificate_sds_secret_configs:
    - {name: switchyard_certificate, sds_config: {{ printf $sds "sds-certificate.json" }}}
    combined_validation_context:
      default_validation_context:
        match_typed_subject_alt_names: [{san_type: DNS, matcher: {exact: {{ .host }}}}]
      validation_context_sds_secret_config: {name: switchyard_ca, sds_config: {{ printf $sds "sds-ca.json" }}}
{{- end -}}

{{/* The Secret holding the shadow-evaluation marker secret (outcomes.shadow). */}}
{{- define "switchyard.shadowSecret" -}}
{{- .Values.outcomes.shadow.existingSecret | default (include "switchyard.fullname" (dict "root" . "component" "shadow")) -}}
{{- end }}
