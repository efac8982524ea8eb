"""Where the platform's runs go on Kubernetes: the run tags of the jobs that train.

Under the ``K8sRunLauncher`` (``deploy/dagster/values.yaml``) a run is one pod, so a job that
trains asks for a GPU node through its run tags. ``dagster-k8s/config`` is merged into that
run pod by the launcher (dagster-k8s's ``UserDefinedDagsterK8sConfig``: a GPU request and
limit, the NVIDIA GPU operator's node label ``nvidia.com/gpu.present`` and taint
``nvidia.com/gpu``, and ``/dev/shm`` in memory for the data loader's workers). ``roadloop/gpu``
is the tag the run queue's ``tagConcurrencyLimits`` hold to one run at a time. Other run
launchers (the local ``dagster dev`` of the demo) ignore both tags.

Plain data, so ``jobs.py`` applies it and the deployment tests read it without importing the
code location.
"""

from __future__ import annotations

from typing import Any

K8S_CONFIG_TAG = "dagster-k8s/config"
GPU_TAG = "roadloop/gpu"

TRAINING_RUN_K8S_CONFIG: dict[str, Any] = {
    "container_config": {
        "resources": {
            "requests": {"cpu": "4", "memory": "16Gi", "nvidia.com/gpu": "1"},
            "limits": {"cpu": "8", "memory": "32Gi", "nvidia.com/gpu": "1"},
        },
        "volume_mounts": [{"name": "dshm", "mount_path": "/dev/shm"}],
    },
    "pod_spec_config": {
        "node_selector": {"nvidia.com/gpu.present": "true"},
        "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
        "volumes": [{"name": "dshm", "empty_dir": {"medium": "Memory", "size_limit": "8Gi"}}],
    },
}

TRAINING_RUN_TAGS: dict[str, Any] = {K8S_CONFIG_TAG: TRAINING_RUN_K8S_CONFIG, GPU_TAG: "true"}
