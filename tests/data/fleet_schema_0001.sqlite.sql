-- The gateway schema before migrations, on sqlite: the DDL that
-- Base.metadata.create_all ran for fleet/db.py at 1c8ade1^ (the parent of
-- "One live device per camera is a partial unique index"). Fixture of
-- tests/test_fleet_migrations.py: what existing databases have. Do not edit.

CREATE TABLE audit_log (
    id INTEGER NOT NULL,
    at DATETIME NOT NULL,
    action VARCHAR(64) NOT NULL,
    outcome VARCHAR(16) NOT NULL,
    actor VARCHAR(200),
    device_id VARCHAR(64),
    token_id INTEGER,
    client VARCHAR(100),
    detail JSON,
    PRIMARY KEY (id)
);
CREATE INDEX ix_audit_log_action ON audit_log (action);
CREATE INDEX ix_audit_log_at ON audit_log (at);
CREATE INDEX ix_audit_log_device_id ON audit_log (device_id);

CREATE TABLE devices (
    device_id VARCHAR(64) NOT NULL,
    camera_id VARCHAR(64) NOT NULL,
    status VARCHAR(32) NOT NULL,
    scopes VARCHAR(200) NOT NULL,
    agent_version VARCHAR(100) NOT NULL,
    hardware JSON,
    enrolled_at DATETIME NOT NULL,
    updated_at DATETIME NOT NULL,
    last_seen_at DATETIME,
    revoked_at DATETIME,
    status_reason TEXT,
    PRIMARY KEY (device_id)
);
CREATE INDEX ix_devices_camera_id ON devices (camera_id);

CREATE TABLE frames (
    id INTEGER NOT NULL,
    camera_id VARCHAR(64) NOT NULL,
    frame_id VARCHAR(64) NOT NULL,
    device_id VARCHAR(64),
    captured_at DATETIME NOT NULL,
    received_at DATETIME NOT NULL,
    path TEXT NOT NULL,
    width INTEGER NOT NULL,
    height INTEGER NOT NULL,
    size_bytes INTEGER NOT NULL,
    sha256 VARCHAR(64),
    model_version VARCHAR(200),
    importance FLOAT NOT NULL,
    reasons JSON NOT NULL,
    n_detections INTEGER NOT NULL,
    recovered BOOLEAN NOT NULL,
    PRIMARY KEY (id),
    CONSTRAINT uq_frames_camera_frame UNIQUE (camera_id, frame_id)
);
CREATE INDEX ix_frames_captured_at ON frames (captured_at);
CREATE INDEX ix_frames_device_id ON frames (device_id);

CREATE TABLE gateway_state (
    "key" VARCHAR(64) NOT NULL,
    value TEXT NOT NULL,
    PRIMARY KEY ("key")
);

CREATE TABLE heartbeats (
    id INTEGER NOT NULL,
    camera_id VARCHAR(64) NOT NULL,
    device_id VARCHAR(64) NOT NULL,
    sent_at DATETIME NOT NULL,
    received_at DATETIME NOT NULL,
    schema_version INTEGER NOT NULL,
    model_version VARCHAR(200),
    fps FLOAT,
    latency_p50_ms FLOAT,
    latency_p95_ms FLOAT,
    errors INTEGER,
    dropped_frames INTEGER,
    outbox_depth INTEGER,
    payload JSON NOT NULL,
    PRIMARY KEY (id),
    CONSTRAINT uq_heartbeats_device_sent UNIQUE (device_id, sent_at)
);
CREATE INDEX ix_heartbeats_camera_sent ON heartbeats (camera_id, sent_at);

CREATE TABLE model_manifests (
    manifest_sha256 VARCHAR(64) NOT NULL,
    file_sha256 VARCHAR(64) NOT NULL,
    size BIGINT NOT NULL,
    model_version VARCHAR(200) NOT NULL,
    rollout_id VARCHAR(100) NOT NULL,
    key_id VARCHAR(16) NOT NULL,
    manifest JSON NOT NULL,
    path TEXT NOT NULL,
    published_at DATETIME NOT NULL,
    published_by VARCHAR(200),
    PRIMARY KEY (manifest_sha256)
);
CREATE INDEX ix_model_manifests_file_sha256 ON model_manifests (file_sha256);
CREATE INDEX ix_model_manifests_model_version ON model_manifests (model_version);
CREATE INDEX ix_model_manifests_published_at ON model_manifests (published_at);

CREATE TABLE rollouts (
    rollout_id VARCHAR(100) NOT NULL,
    manifest_sha256 VARCHAR(64) NOT NULL,
    model_version VARCHAR(200) NOT NULL,
    status VARCHAR(16) NOT NULL,
    stages JSON NOT NULL,
    stage_index INTEGER NOT NULL,
    stage_started_at DATETIME NOT NULL,
    cohort_threshold FLOAT NOT NULL,
    hold_seconds FLOAT NOT NULL,
    budgets JSON NOT NULL,
    previous_model_version VARCHAR(200),
    previous_manifest_sha256 VARCHAR(64),
    created_at DATETIME NOT NULL,
    updated_at DATETIME NOT NULL,
    finished_at DATETIME,
    reason TEXT,
    created_by VARCHAR(200),
    history JSON NOT NULL,
    health JSON NOT NULL,
    PRIMARY KEY (rollout_id),
    FOREIGN KEY(manifest_sha256) REFERENCES model_manifests (manifest_sha256)
);
CREATE INDEX ix_rollouts_created_at ON rollouts (created_at);
CREATE INDEX ix_rollouts_status ON rollouts (status);

CREATE TABLE tokens (
    id INTEGER NOT NULL,
    token_hash VARCHAR(64) NOT NULL,
    kind VARCHAR(16) NOT NULL,
    device_id VARCHAR(64),
    scopes VARCHAR(200) NOT NULL,
    camera_id VARCHAR(64),
    require_verification BOOLEAN NOT NULL,
    label VARCHAR(200),
    created_at DATETIME NOT NULL,
    expires_at DATETIME NOT NULL,
    used_at DATETIME,
    revoked_at DATETIME,
    parent_id INTEGER,
    PRIMARY KEY (id),
    FOREIGN KEY(device_id) REFERENCES devices (device_id)
);
CREATE INDEX ix_tokens_device_id ON tokens (device_id);
CREATE UNIQUE INDEX ix_tokens_token_hash ON tokens (token_hash);
