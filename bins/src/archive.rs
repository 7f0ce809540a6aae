//! `streamctl dlq archive`: dead letters moved from the dead-letter topic into
//! S3-compatible object storage, where the topic's retention cannot delete
//! them; and the reads behind `streamctl dlq stats|show|replay --from-archive`.
//!
//! The layout in the bucket, under an optional prefix:
//!
//! ```text
//! <dlq-topic>/dt=YYYY-MM-DD/hr=HH/<dlq-topic>+<partition>+<first offset, 20 digits>.jsonl.gz
//! <dlq-topic>/_manifests/partition=<partition>/<first offset, 20 digits>.json
//! ```
//!
//! - **Objects**: gzip-compressed JSON Lines, one [`ArchivedRecord`] per dead
//!   letter: its place in the dead-letter topic, timestamp, key and payload
//!   (text when UTF-8, base64 otherwise, said by `*_encoding`) and every
//!   header (`dlq.*` and the rest). One object holds consecutive dead letters
//!   of one partition of the dead-letter topic, all from one hour (UTC, by the
//!   record's timestamp, which `dt=`/`hr=` name). A batch is closed when it
//!   reaches `--max-batch-bytes` (uncompressed) or `--max-batch-records`, when
//!   its first dead letter is `--max-batch-age-secs` old, when the next dead
//!   letter belongs to another hour, and at the end of a run.
//! - **Manifests**: one per object, written after it ([`Manifest`]): which
//!   object, which offsets, how many records, their SHA-256, error types and
//!   source positions. An object counts once its manifest is there: readers
//!   go through the manifests and check each object against its manifest.
//!
//! Nothing is written twice. An object's name comes from its first position
//! (dead-letter partition and offset) and that record's timestamp, never from
//! when it was written. The archive itself says where to resume: a run reads
//! each partition's manifests and goes on after the last offset they cover.
//! A run killed before a manifest resumes at that object's first offset and
//! writes the same name again (a PUT replaces it whole), so its dead letters
//! are in the archive once. The archiver's consumer group (`--archiver-group`)
//! gets the same offsets committed, only so that `streamctl lag` shows how far
//! behind the archive is.

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context};
use aws_sdk_s3::config::{
    BehaviorVersion, Credentials, Region, RequestChecksumCalculation, ResponseChecksumValidation,
};
use aws_sdk_s3::error::DisplayErrorContext;
use aws_sdk_s3::primitives::ByteStream;
use aws_sdk_s3::Client;
use base64::Engine;
use futures::{StreamExt, TryStreamExt};
use rdkafka::consumer::{CommitMode, Consumer, StreamConsumer};
use rdkafka::{Offset, TopicPartitionList};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use stream_actors::faults::{CrashPoint, Faults};
use stream_actors::kafka::Brokers;
use stream_actors::topic::KAFKA_TIMEOUT;
use tracing::{info, warn};

use crate::config::{invalid, ConfigError, ConnectionArgs};
use crate::inspect::{partitions, ReadRecord};

/// The folder of the manifests, under `<dlq-topic>/`.
pub const MANIFESTS: &str = "_manifests";

/// Where the archive is: an S3 endpoint, credentials, a bucket, a prefix.
#[derive(Debug, Clone, clap::Args)]
pub struct S3Args {
    /// S3 endpoint URL (moto's S3 locally; any S3-compatible endpoint).
    #[arg(long, env = "S3_ENDPOINT", default_value = "http://127.0.0.1:4566")]
    pub s3_endpoint: String,
    /// S3 region.
    #[arg(long, env = "AWS_REGION", default_value = "us-east-1")]
    pub s3_region: String,
    /// S3 access key id.
    #[arg(long, env = "AWS_ACCESS_KEY_ID", default_value = "test")]
    pub s3_access_key_id: String,
    /// S3 secret access key.
    #[arg(
        long,
        env = "AWS_SECRET_ACCESS_KEY",
        default_value = "test",
        hide_env_values = true
    )]
    pub s3_secret_access_key: String,
    /// The bucket the dead letters are archived in.
    #[arg(long, env = "DLQ_ARCHIVE_BUCKET", default_value = "dead-letters")]
    pub archive_bucket: String,
    /// A key prefix before `<dlq-topic>/`, e.g. `prod/` (default: none).
    #[arg(long, env = "DLQ_ARCHIVE_PREFIX", default_value = "")]
    pub archive_prefix: String,
}

impl S3Args {
    /// Checks the settings and makes the client.
    pub fn archive(&self) -> Result<Archive, ConfigError> {
        if !(self.s3_endpoint.starts_with("http://") || self.s3_endpoint.starts_with("https://")) {
            return Err(invalid(
                "--s3-endpoint",
                "S3_ENDPOINT",
                format!(
                    "must start with http:// or https://, got {:?}",
                    self.s3_endpoint
                ),
            ));
        }
        if self.s3_region.trim().is_empty() {
            return Err(invalid("--s3-region", "AWS_REGION", "must not be empty"));
        }
        let bucket = &self.archive_bucket;
        let valid_bucket = (3..=63).contains(&bucket.len())
            && bucket.bytes().all(|byte| {
                byte.is_ascii_lowercase() || byte.is_ascii_digit() || b".-".contains(&byte)
            })
            && bucket.starts_with(|c: char| c.is_ascii_alphanumeric())
            && bucket.ends_with(|c: char| c.is_ascii_alphanumeric());
        if !valid_bucket {
            return Err(invalid(
                "--archive-bucket",
                "DLQ_ARCHIVE_BUCKET",
                format!(
                    "{bucket:?} is not a bucket name (3 to 63 lowercase letters, digits, dots and hyphens, starting and ending with a letter or digit)"
                ),
            ));
        }
        let mut prefix = self.archive_prefix.trim_start_matches('/').to_string();
        if !prefix.is_empty() && !prefix.ends_with('/') {
            prefix.push('/');
        }
        let config = aws_sdk_s3::Config::builder()
            .behavior_version(BehaviorVersion::latest())
            .endpoint_url(&self.s3_endpoint)
            .region(Region::new(self.s3_region.clone()))
            .credentials_provider(Credentials::new(
                &self.s3_access_key_id,
                &self.s3_secret_access_key,
                None,
                None,
                "streamctl",
            ))
            // Bucket in the path, not the host name: what local and in-cluster
            // S3 servers (moto, MinIO) answer.
            .force_path_style(true)
            // Checksums only where the API requires them: S3-compatible
            // servers do not all know the newer flexible checksums.
            .request_checksum_calculation(RequestChecksumCalculation::WhenRequired)
            .response_checksum_validation(ResponseChecksumValidation::WhenRequired)
            // No call waits forever: an endpoint that accepts and never
            // answers is an error the archiver reports (and, following, dies
            // of, to be restarted), not a loop that stands still.
            .timeout_config(
                aws_sdk_s3::config::timeout::TimeoutConfig::builder()
                    .connect_timeout(Duration::from_secs(5))
                    .operation_attempt_timeout(Duration::from_secs(30))
                    .operation_timeout(Duration::from_secs(120))
                    .build(),
            )
            .build();
        Ok(Archive {
            client: Client::from_conf(config),
            endpoint: self.s3_endpoint.clone(),
            bucket: bucket.clone(),
            prefix,
        })
    }
}

/// A dead letter in an archive object (one JSON line).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ArchivedRecord {
    /// The dead-letter topic it was read from.
    pub dlq_topic: String,
    /// Its partition there.
    pub dlq_partition: i32,
    /// Its offset there.
    pub dlq_offset: i64,
    /// The record's timestamp (ms since the Unix epoch).
    pub timestamp_ms: Option<i64>,
    /// The key, as `key_encoding` says.
    pub key: Option<String>,
    /// `utf8` (the key as text) or `base64`.
    pub key_encoding: Encoding,
    /// The payload, as `payload_encoding` says.
    pub payload: Option<String>,
    /// `utf8` (the payload as text) or `base64`.
    pub payload_encoding: Encoding,
    /// Every header, by name (the first, if a name repeats).
    pub headers: BTreeMap<String, String>,
}

/// How bytes are written in a JSON line.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Encoding {
    /// As text: the bytes are UTF-8.
    Utf8,
    /// Base64 (standard alphabet, padded): the bytes are not UTF-8.
    Base64,
}

fn encode(bytes: Option<&[u8]>) -> (Option<String>, Encoding) {
    match bytes {
        None => (None, Encoding::Utf8),
        Some(bytes) => match std::str::from_utf8(bytes) {
            Ok(text) => (Some(text.to_string()), Encoding::Utf8),
            Err(_) => (
                Some(base64::engine::general_purpose::STANDARD.encode(bytes)),
                Encoding::Base64,
            ),
        },
    }
}

fn decode(text: Option<&str>, encoding: Encoding) -> anyhow::Result<Option<Vec<u8>>> {
    Ok(match (text, encoding) {
        (None, _) => None,
        (Some(text), Encoding::Utf8) => Some(text.as_bytes().to_vec()),
        (Some(text), Encoding::Base64) => Some(
            base64::engine::general_purpose::STANDARD
                .decode(text)
                .context("a base64 field does not decode")?,
        ),
    })
}

impl ArchivedRecord {
    /// A dead letter read from `dlq_topic`, as it is archived.
    pub fn from_read(dlq_topic: &str, record: &ReadRecord) -> ArchivedRecord {
        let (key, key_encoding) = encode(record.key.as_deref());
        let (payload, payload_encoding) = encode(record.payload.as_deref());
        let mut headers = BTreeMap::new();
        for (name, value) in &record.headers {
            headers.entry(name.clone()).or_insert_with(|| value.clone());
        }
        ArchivedRecord {
            dlq_topic: dlq_topic.to_string(),
            dlq_partition: record.partition,
            dlq_offset: record.offset,
            timestamp_ms: record.timestamp_ms,
            key,
            key_encoding,
            payload,
            payload_encoding,
            headers,
        }
    }

    /// The dead letter as `streamctl dlq` reads it from the topic.
    pub fn to_read(&self) -> anyhow::Result<ReadRecord> {
        Ok(ReadRecord {
            partition: self.dlq_partition,
            offset: self.dlq_offset,
            key: decode(self.key.as_deref(), self.key_encoding)?,
            payload: decode(self.payload.as_deref(), self.payload_encoding)?,
            headers: self
                .headers
                .iter()
                .map(|(name, value)| (name.clone(), value.clone()))
                .collect(),
            timestamp_ms: self.timestamp_ms,
        })
    }
}

/// What is known of one archive object; written next to it, after it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Manifest {
    /// The object's key in the bucket.
    pub object: String,
    /// The dead-letter topic.
    pub dlq_topic: String,
    /// Its partition.
    pub dlq_partition: i32,
    /// The first offset in the object.
    pub first_offset: i64,
    /// The last offset in the object.
    pub last_offset: i64,
    /// How many dead letters (fewer than the offsets span where the topic
    /// has gaps: transaction markers, compaction).
    pub records: u64,
    /// The JSON Lines' size.
    pub uncompressed_bytes: u64,
    /// The object's size.
    pub compressed_bytes: u64,
    /// SHA-256 of the object, hex.
    pub sha256: String,
    /// The first record's timestamp (ms).
    pub first_timestamp_ms: Option<i64>,
    /// The last record's timestamp (ms).
    pub last_timestamp_ms: Option<i64>,
    /// Dead letters by `dlq.error.type`.
    pub by_error_type: BTreeMap<String, u64>,
    /// Per source `topic/partition`, the lowest and highest source offset
    /// (`dlq.source.*` headers) among the object's dead letters.
    pub source_offsets: BTreeMap<String, (i64, i64)>,
    /// When the object was written (ms since the Unix epoch).
    pub archived_at_ms: i64,
}

/// `dt=YYYY-MM-DD/hr=HH` (UTC) of a timestamp; `dt=unknown/hr=unknown` without one.
pub fn hour_folder(timestamp_ms: Option<i64>) -> String {
    let Some(moment) = timestamp_ms
        .and_then(|ms| time::OffsetDateTime::from_unix_timestamp(ms.div_euclid(1000)).ok())
    else {
        return "dt=unknown/hr=unknown".to_string();
    };
    format!(
        "dt={:04}-{:02}-{:02}/hr={:02}",
        moment.year(),
        u8::from(moment.month()),
        moment.day(),
        moment.hour()
    )
}

/// The timestamp an archived dead letter is filed under: the record's,
/// else the `dlq.failed_at` header's.
fn filed_at(record: &ReadRecord) -> Option<i64> {
    record.timestamp_ms.filter(|ms| *ms > 0).or_else(|| {
        record
            .header("dlq.failed_at")
            .and_then(|text| text.parse().ok())
    })
}

/// The S3 error with its code, message and cause.
fn s3_error(error: impl std::error::Error) -> String {
    DisplayErrorContext(error).to_string()
}

/// A bucket, a prefix, a client.
#[derive(Debug, Clone)]
pub struct Archive {
    client: Client,
    endpoint: String,
    bucket: String,
    prefix: String,
}

impl Archive {
    /// The bucket's name.
    pub fn bucket(&self) -> &str {
        &self.bucket
    }

    /// `<prefix><dlq-topic>/`.
    pub fn topic_prefix(&self, dlq_topic: &str) -> String {
        format!("{}{dlq_topic}/", self.prefix)
    }

    /// The key of the object that starts at `first_offset`.
    pub fn object_key(
        &self,
        dlq_topic: &str,
        partition: i32,
        first_offset: i64,
        timestamp_ms: Option<i64>,
    ) -> String {
        format!(
            "{}{}/{dlq_topic}+{partition}+{first_offset:020}.jsonl.gz",
            self.topic_prefix(dlq_topic),
            hour_folder(timestamp_ms)
        )
    }

    fn manifest_folder(&self, dlq_topic: &str, partition: i32) -> String {
        format!(
            "{}{MANIFESTS}/partition={partition}/",
            self.topic_prefix(dlq_topic)
        )
    }

    /// The key of the manifest of the object that starts at `first_offset`.
    pub fn manifest_key(&self, dlq_topic: &str, partition: i32, first_offset: i64) -> String {
        format!(
            "{}{first_offset:020}.json",
            self.manifest_folder(dlq_topic, partition)
        )
    }

    /// Checks that the bucket answers; creates it when missing and `create`.
    pub async fn ensure_bucket(&self, create: bool) -> anyhow::Result<()> {
        let head = self.client.head_bucket().bucket(&self.bucket).send().await;
        let Err(error) = head else {
            return Ok(());
        };
        let missing = error
            .as_service_error()
            .is_some_and(|service| service.is_not_found());
        if !missing {
            bail!(
                "cannot reach bucket {} at {}: {}",
                self.bucket,
                self.endpoint,
                s3_error(error)
            );
        }
        if !create {
            bail!(
                "bucket {} does not exist at {} (create it, or pass --create-bucket)",
                self.bucket,
                self.endpoint
            );
        }
        self.client
            .create_bucket()
            .bucket(&self.bucket)
            .send()
            .await
            .map_err(|error| {
                anyhow::anyhow!(
                    "cannot create bucket {} at {}: {}",
                    self.bucket,
                    self.endpoint,
                    s3_error(error)
                )
            })?;
        info!(bucket = %self.bucket, endpoint = %self.endpoint, "created the archive bucket");
        Ok(())
    }

    /// Every key under `prefix`, sorted.
    pub async fn list(&self, prefix: &str) -> anyhow::Result<Vec<String>> {
        let pages: Vec<_> = self
            .client
            .list_objects_v2()
            .bucket(&self.bucket)
            .prefix(prefix)
            .into_paginator()
            .send()
            .try_collect()
            .await
            .map_err(|error| {
                anyhow::anyhow!(
                    "cannot list s3://{}/{prefix} at {}: {}",
                    self.bucket,
                    self.endpoint,
                    s3_error(error)
                )
            })?;
        let mut keys: Vec<String> = pages
            .iter()
            .flat_map(|page| page.contents())
            .filter_map(|object| object.key().map(str::to_string))
            .collect();
        keys.sort();
        Ok(keys)
    }

    async fn get(&self, key: &str) -> anyhow::Result<Vec<u8>> {
        let output = self
            .client
            .get_object()
            .bucket(&self.bucket)
            .key(key)
            .send()
            .await
            .map_err(|error| {
                anyhow::anyhow!(
                    "cannot read s3://{}/{key} at {}: {}",
                    self.bucket,
                    self.endpoint,
                    s3_error(error)
                )
            })?;
        let body = output
            .body
            .collect()
            .await
            .with_context(|| format!("cannot read the body of s3://{}/{key}", self.bucket))?;
        Ok(body.into_bytes().to_vec())
    }

    async fn put(&self, key: &str, body: Vec<u8>, content_type: &str) -> anyhow::Result<()> {
        self.client
            .put_object()
            .bucket(&self.bucket)
            .key(key)
            .content_type(content_type)
            .body(ByteStream::from(body))
            .send()
            .await
            .map_err(|error| {
                anyhow::anyhow!(
                    "cannot write s3://{}/{key} at {}: {}",
                    self.bucket,
                    self.endpoint,
                    s3_error(error)
                )
            })?;
        Ok(())
    }

    async fn manifest(&self, key: &str) -> anyhow::Result<Manifest> {
        let bytes = self.get(key).await?;
        serde_json::from_slice(&bytes)
            .with_context(|| format!("s3://{}/{key} is not a manifest", self.bucket))
    }

    /// The manifests of `dlq_topic`'s archive, by partition and first offset.
    pub async fn manifests(&self, dlq_topic: &str) -> anyhow::Result<Vec<Manifest>> {
        let keys = self
            .list(&format!("{}{MANIFESTS}/", self.topic_prefix(dlq_topic)))
            .await?;
        let mut manifests: Vec<Manifest> = futures::stream::iter(keys)
            .map(|key| async move { self.manifest(&key).await })
            .buffered(8)
            .try_collect()
            .await?;
        manifests.sort_by_key(|manifest| (manifest.dlq_partition, manifest.first_offset));
        Ok(manifests)
    }

    /// Where the archive of `dlq_topic`/`partition` goes on: one past the
    /// last offset its manifests cover (None: nothing archived yet).
    pub async fn archived_next(
        &self,
        dlq_topic: &str,
        partition: i32,
    ) -> anyhow::Result<Option<i64>> {
        let keys = self
            .list(&self.manifest_folder(dlq_topic, partition))
            .await?;
        match keys.last() {
            None => Ok(None),
            Some(key) => Ok(Some(self.manifest(key).await?.last_offset + 1)),
        }
    }

    /// The dead letters in one object, checked against its manifest.
    pub async fn object_records(&self, manifest: &Manifest) -> anyhow::Result<Vec<ArchivedRecord>> {
        let object = &manifest.object;
        let compressed = self.get(object).await?;
        let sha256 = hex_digest(&compressed);
        if sha256 != manifest.sha256 {
            bail!(
                "s3://{}/{object} does not match its manifest (SHA-256 {sha256}, the manifest says {})",
                self.bucket,
                manifest.sha256
            );
        }
        let mut lines = String::new();
        flate2::read::GzDecoder::new(compressed.as_slice())
            .read_to_string(&mut lines)
            .with_context(|| {
                format!("s3://{}/{object} is not gzip-compressed text", self.bucket)
            })?;
        let records = lines
            .lines()
            .enumerate()
            .map(|(index, line)| {
                serde_json::from_str::<ArchivedRecord>(line).with_context(|| {
                    format!(
                        "s3://{}/{object} line {}: not a dead letter",
                        self.bucket,
                        index + 1
                    )
                })
            })
            .collect::<anyhow::Result<Vec<_>>>()?;
        if records.len() as u64 != manifest.records {
            bail!(
                "s3://{}/{object} holds {} dead letters, its manifest says {}",
                self.bucket,
                records.len(),
                manifest.records
            );
        }
        Ok(records)
    }

    /// Every archived dead letter of `dlq_topic`, by partition and offset,
    /// as `streamctl dlq` reads them from the topic.
    pub async fn read(&self, dlq_topic: &str) -> anyhow::Result<Vec<ReadRecord>> {
        let manifests = self.manifests(dlq_topic).await?;
        let objects: Vec<Vec<ArchivedRecord>> = futures::stream::iter(&manifests)
            .map(|manifest| self.object_records(manifest))
            .buffered(8)
            .try_collect()
            .await?;
        objects
            .iter()
            .flatten()
            .map(ArchivedRecord::to_read)
            .collect()
    }

    /// Writes `batch` (object, then manifest) and returns its manifest.
    async fn write(&self, batch: &Batch, faults: &Faults) -> anyhow::Result<Manifest> {
        let mut encoder = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
        encoder.write_all(&batch.lines)?;
        let compressed = encoder.finish()?;
        let object = self.object_key(
            &batch.dlq_topic,
            batch.partition,
            batch.first_offset,
            batch.first_timestamp_ms,
        );
        let manifest = Manifest {
            object: object.clone(),
            dlq_topic: batch.dlq_topic.clone(),
            dlq_partition: batch.partition,
            first_offset: batch.first_offset,
            last_offset: batch.last_offset,
            records: batch.records,
            uncompressed_bytes: batch.lines.len() as u64,
            compressed_bytes: compressed.len() as u64,
            sha256: hex_digest(&compressed),
            first_timestamp_ms: batch.first_timestamp_ms,
            last_timestamp_ms: batch.last_timestamp_ms,
            by_error_type: batch.by_error_type.clone(),
            source_offsets: batch.source_offsets.clone(),
            archived_at_ms: now_ms(),
        };
        self.put(&object, compressed, "application/gzip").await?;
        faults.reached(CrashPoint::AfterArchiveObject);
        self.put(
            &self.manifest_key(&batch.dlq_topic, batch.partition, batch.first_offset),
            serde_json::to_vec_pretty(&manifest)?,
            "application/json",
        )
        .await?;
        Ok(manifest)
    }
}

fn hex_digest(bytes: &[u8]) -> String {
    Sha256::digest(bytes)
        .iter()
        .map(|byte| format!("{byte:02x}"))
        .collect()
}

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|elapsed| elapsed.as_millis() as i64)
        .unwrap_or_default()
}

/// Dead letters of one partition on their way into one object.
#[derive(Debug)]
struct Batch {
    dlq_topic: String,
    partition: i32,
    folder: String,
    first_offset: i64,
    last_offset: i64,
    records: u64,
    lines: Vec<u8>,
    first_timestamp_ms: Option<i64>,
    last_timestamp_ms: Option<i64>,
    by_error_type: BTreeMap<String, u64>,
    source_offsets: BTreeMap<String, (i64, i64)>,
    opened: Instant,
}

impl Batch {
    fn open(dlq_topic: &str, record: &ReadRecord) -> Batch {
        let timestamp = filed_at(record);
        Batch {
            dlq_topic: dlq_topic.to_string(),
            partition: record.partition,
            folder: hour_folder(timestamp),
            first_offset: record.offset,
            last_offset: record.offset,
            records: 0,
            lines: Vec::new(),
            first_timestamp_ms: timestamp,
            last_timestamp_ms: timestamp,
            by_error_type: BTreeMap::new(),
            source_offsets: BTreeMap::new(),
            opened: Instant::now(),
        }
    }

    fn add(&mut self, record: &ReadRecord) -> anyhow::Result<()> {
        let mut archived = ArchivedRecord::from_read(&self.dlq_topic, record);
        archived.timestamp_ms = filed_at(record);
        serde_json::to_writer(&mut self.lines, &archived)?;
        self.lines.push(b'\n');
        self.records += 1;
        self.last_offset = record.offset;
        self.last_timestamp_ms = archived.timestamp_ms;
        crate::dlq::count_error_type(&mut self.by_error_type, record);
        let source = (
            record.header("dlq.source.topic"),
            record.header("dlq.source.partition"),
            record
                .header("dlq.source.offset")
                .and_then(|text| text.parse::<i64>().ok()),
        );
        if let (Some(topic), Some(partition), Some(offset)) = source {
            let range = self
                .source_offsets
                .entry(format!("{topic}/{partition}"))
                .or_insert((offset, offset));
            range.0 = range.0.min(offset);
            range.1 = range.1.max(offset);
        }
        Ok(())
    }
}

/// `streamctl dlq archive`.
#[derive(Debug, Clone, clap::Args)]
pub struct ArchiveArgs {
    /// The brokers and the dead-letter topic (`--dlq-topic`).
    #[command(flatten)]
    pub connections: ConnectionArgs,
    /// The archive.
    #[command(flatten)]
    pub s3: S3Args,
    /// Keep running: archive new dead letters as they come, closing batches
    /// by size and age, until SIGTERM or SIGINT (which close the open
    /// batches first). Without it: archive up to the topic's end as it is
    /// at the start, then exit.
    #[arg(long)]
    pub follow: bool,
    /// Close a batch at this many bytes of JSON Lines (before compression).
    #[arg(long, env = "DLQ_ARCHIVE_MAX_BATCH_BYTES", default_value_t = 5 * 1024 * 1024)]
    pub max_batch_bytes: u64,
    /// Close a batch at this many dead letters.
    #[arg(long, env = "DLQ_ARCHIVE_MAX_BATCH_RECORDS", default_value_t = 100_000)]
    pub max_batch_records: u64,
    /// Close a batch this many seconds after its first dead letter arrived.
    #[arg(long, env = "DLQ_ARCHIVE_MAX_BATCH_AGE_SECS", default_value_t = 300)]
    pub max_batch_age_secs: u64,
    /// The consumer group the archiver commits its progress to (only shown
    /// by `streamctl lag`; the archive's manifests say where to resume).
    #[arg(long, env = "DLQ_ARCHIVER_GROUP", default_value = "dlq-archiver")]
    pub archiver_group: String,
    /// Create the bucket when it does not exist.
    #[arg(long)]
    pub create_bucket: bool,
    /// Serve `/metrics` (dead letters and objects archived, each partition's
    /// archived offset, dead letters held in open batches) and `/healthz`
    /// (503 when the archiver's loop has not turned for 30 s) on this
    /// address, e.g. 0.0.0.0:9468.
    #[arg(long, env = "DLQ_ARCHIVER_ADDR")]
    pub serve: Option<std::net::SocketAddr>,
}

impl ArchiveArgs {
    /// Checks the settings: the brokers, and the archive's client.
    pub fn validate(&self) -> Result<(Brokers, Archive), ConfigError> {
        let brokers = self.connections.kafka()?;
        if self.connections.dlq_topic.trim().is_empty() {
            return Err(invalid(
                "--dlq-topic",
                "KAFKA_DLQ_TOPIC",
                "must not be empty",
            ));
        }
        if self.archiver_group.trim().is_empty() {
            return Err(invalid(
                "--archiver-group",
                "DLQ_ARCHIVER_GROUP",
                "must not be empty",
            ));
        }
        if self.archiver_group == self.connections.group {
            return Err(invalid(
                "--archiver-group",
                "DLQ_ARCHIVER_GROUP",
                format!(
                    "must differ from the pipeline's group {:?}: the archiver's commits would move the pipeline's",
                    self.connections.group
                ),
            ));
        }
        for (value, flag, env) in [
            (
                self.max_batch_bytes,
                "--max-batch-bytes",
                "DLQ_ARCHIVE_MAX_BATCH_BYTES",
            ),
            (
                self.max_batch_records,
                "--max-batch-records",
                "DLQ_ARCHIVE_MAX_BATCH_RECORDS",
            ),
            (
                self.max_batch_age_secs,
                "--max-batch-age-secs",
                "DLQ_ARCHIVE_MAX_BATCH_AGE_SECS",
            ),
        ] {
            if value == 0 {
                return Err(invalid(flag, env, "must be at least 1"));
            }
        }
        Ok((brokers, self.s3.archive()?))
    }
}

/// How long the archiver's loop may stand still before `/healthz` says so.
const STUCK_AFTER: Duration = Duration::from_secs(30);

/// The archiver's metrics (a recorder of its own) and the last turn of its loop.
#[derive(Clone)]
struct Telemetry {
    recorder: std::sync::Arc<metrics_exporter_prometheus::PrometheusRecorder>,
    turned: std::sync::Arc<parking_lot::Mutex<Instant>>,
    dlq_topic: String,
}

impl Telemetry {
    fn new(dlq_topic: &str) -> Telemetry {
        Telemetry {
            recorder: std::sync::Arc::new(
                metrics_exporter_prometheus::PrometheusBuilder::new().build_recorder(),
            ),
            turned: std::sync::Arc::new(parking_lot::Mutex::new(Instant::now())),
            dlq_topic: dlq_topic.to_string(),
        }
    }

    fn turned(&self) {
        *self.turned.lock() = Instant::now();
    }

    fn written(&self, manifest: &Manifest) {
        let topic = self.dlq_topic.clone();
        metrics::with_local_recorder(&*self.recorder, || {
            metrics::counter!("stream_dlq_archive_records_total", "dlq_topic" => topic.clone())
                .increment(manifest.records);
            metrics::counter!("stream_dlq_archive_objects_total", "dlq_topic" => topic.clone())
                .increment(1);
            metrics::counter!("stream_dlq_archive_bytes_total", "dlq_topic" => topic.clone())
                .increment(manifest.compressed_bytes);
            metrics::gauge!(
                "stream_dlq_archive_next_offset",
                "dlq_topic" => topic.clone(),
                "partition" => manifest.dlq_partition.to_string()
            )
            .set((manifest.last_offset + 1) as f64);
            metrics::gauge!("stream_dlq_archive_last_write_timestamp_seconds", "dlq_topic" => topic)
                .set(now_ms() as f64 / 1000.0);
        });
    }

    fn started(&self, resumed_at: &BTreeMap<i32, i64>, expired: &BTreeMap<i32, (i64, i64)>) {
        let topic = self.dlq_topic.clone();
        metrics::with_local_recorder(&*self.recorder, || {
            for (partition, offset) in resumed_at {
                metrics::gauge!(
                    "stream_dlq_archive_next_offset",
                    "dlq_topic" => topic.clone(),
                    "partition" => partition.to_string()
                )
                .set(*offset as f64);
            }
            let lost: i64 = expired.values().map(|(first, end)| end - first).sum();
            metrics::counter!("stream_dlq_archive_expired_records_total", "dlq_topic" => topic.clone())
                .increment(lost as u64);
            metrics::counter!("stream_dlq_archive_records_total", "dlq_topic" => topic.clone())
                .increment(0);
            metrics::counter!("stream_dlq_archive_objects_total", "dlq_topic" => topic)
                .increment(0);
        });
    }

    fn holding(&self, batches: &BTreeMap<i32, Batch>) {
        let held: u64 = batches.values().map(|batch| batch.records).sum();
        let topic = self.dlq_topic.clone();
        metrics::with_local_recorder(&*self.recorder, || {
            metrics::gauge!("stream_dlq_archive_open_records", "dlq_topic" => topic)
                .set(held as f64);
        });
    }

    /// Serves `/metrics` and `/healthz` on `listener`.
    fn serve(&self, listener: tokio::net::TcpListener) {
        use axum::http::{header, StatusCode};
        use axum::routing::get;
        let handle = self.recorder.handle();
        let turned = self.turned.clone();
        let app = crate::admin::with_limits(
            axum::Router::new()
                .route(
                    "/metrics",
                    get(move || {
                        let body = handle.render();
                        async move { ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], body) }
                    }),
                )
                .route(
                    "/healthz",
                    get(move || {
                        let still = turned.lock().elapsed();
                        async move {
                            if still > STUCK_AFTER {
                                (
                                    StatusCode::SERVICE_UNAVAILABLE,
                                    format!("the archiver's loop has not turned for {still:?}\n"),
                                )
                            } else {
                                (StatusCode::OK, "ok\n".to_string())
                            }
                        }
                    }),
                ),
        );
        tokio::spawn(crate::admin::serve_router(listener, app));
    }
}

/// What a run of the archiver did.
#[derive(Debug, Clone, Default, Serialize, PartialEq)]
pub struct ArchiveOutcome {
    /// Objects written (each with its manifest).
    pub objects: u64,
    /// Dead letters in them.
    pub records: u64,
    /// Per partition, the offset the run started at.
    pub resumed_at: BTreeMap<i32, i64>,
    /// Per partition, where the archive ends after the run (one past the
    /// last archived offset, or the first offset retention kept).
    pub archived_next: BTreeMap<i32, i64>,
    /// Per partition, dead letters the topic's retention deleted before they
    /// were archived: (first, end) offsets.
    pub expired: BTreeMap<i32, (i64, i64)>,
}

/// Archives the dead letters of `args.connections.dlq_topic` until the end of
/// the topic (or, with `--follow`, until `stop` completes). Writes a line
/// per object to stdout.
pub async fn run(
    args: &ArchiveArgs,
    faults: &Faults,
    stop: impl std::future::Future<Output = ()>,
) -> anyhow::Result<ArchiveOutcome> {
    let (brokers, archive) = args.validate()?;
    let dlq_topic = args.connections.dlq_topic.clone();
    let telemetry = Telemetry::new(&dlq_topic);
    if let Some(address) = args.serve {
        let listener = tokio::net::TcpListener::bind(address)
            .await
            .with_context(|| {
                format!("invalid setting --serve (DLQ_ARCHIVER_ADDR): cannot listen on {address}")
            })?;
        telemetry.serve(listener);
        eprintln!("streamctl dlq archive: /metrics and /healthz at http://{address}");
    }
    archive.ensure_bucket(args.create_bucket).await?;
    let consumer: StreamConsumer = brokers
        .client_config()
        .set("group.id", &args.archiver_group)
        .set("enable.auto.commit", "false")
        .set("enable.partition.eof", "false")
        // Fallen so far behind that retention deleted the next dead letters
        // (only while following): go on from the first one kept, never from
        // the end, which would skip every dead letter in between.
        .set("auto.offset.reset", "earliest")
        .set("queued.max.messages.kbytes", "16384")
        .create()
        .with_context(|| format!("cannot create a kafka client for {brokers}"))?;

    let topic_partitions = {
        let (brokers, topic) = (brokers.clone(), dlq_topic.clone());
        tokio::task::spawn_blocking(move || partitions(&brokers, &topic)).await??
    };
    let mut outcome = ArchiveOutcome::default();
    let mut assignment = TopicPartitionList::new();
    // Per partition, where the run stops when not following (the end offset
    // at the start); partitions already there are left out.
    let mut ends: BTreeMap<i32, i64> = BTreeMap::new();
    for partition in topic_partitions {
        let (low, high) = consumer
            .fetch_watermarks(&dlq_topic, partition, KAFKA_TIMEOUT)
            .with_context(|| format!("cannot read the offsets of {dlq_topic}/{partition}"))?;
        let resume = archive
            .archived_next(&dlq_topic, partition)
            .await?
            .unwrap_or(0);
        if resume < low {
            warn!(
                partition,
                first = resume,
                end = low,
                "dead letters {dlq_topic}/{partition} {resume}..{low} were deleted by the topic's retention before they were archived"
            );
            outcome.expired.insert(partition, (resume, low));
        }
        let start = resume.max(low);
        outcome.resumed_at.insert(partition, start);
        outcome.archived_next.insert(partition, start);
        if !args.follow && start >= high {
            continue;
        }
        ends.insert(partition, high);
        assignment.add_partition_offset(&dlq_topic, partition, Offset::Offset(start))?;
    }
    telemetry.started(&outcome.resumed_at, &outcome.expired);
    let until = if args.follow {
        " (following; SIGTERM or SIGINT to stop)".to_string()
    } else {
        format!(" up to {ends:?}")
    };
    if ends.is_empty() {
        commit_progress(&consumer, &dlq_topic, &outcome.archived_next);
        println!(
            "nothing to archive: s3://{}/{} reaches the end of every partition of {dlq_topic} {:?}",
            archive.bucket(),
            archive.topic_prefix(&dlq_topic),
            outcome.resumed_at
        );
        return Ok(outcome);
    }
    println!(
        "archiving {dlq_topic} to s3://{}/{} from {:?}{until}",
        archive.bucket(),
        archive.topic_prefix(&dlq_topic),
        outcome.resumed_at,
    );
    consumer
        .assign(&assignment)
        .context("cannot assign the dead-letter topic's partitions")?;

    let mut batches: BTreeMap<i32, Batch> = BTreeMap::new();
    let max_age = Duration::from_secs(args.max_batch_age_secs);
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tokio::pin!(stop);
    let mut done: std::collections::BTreeSet<i32> = std::collections::BTreeSet::new();
    loop {
        if !args.follow && done.len() == ends.len() {
            break;
        }
        tokio::select! {
            _ = &mut stop => break,
            _ = tick.tick() => {
                // Once a second, not per record: the health and the gauge.
                telemetry.turned();
                telemetry.holding(&batches);
                let aged: Vec<i32> = batches
                    .iter()
                    .filter(|(_, batch)| batch.opened.elapsed() >= max_age)
                    .map(|(partition, _)| *partition)
                    .collect();
                for partition in aged {
                    let batch = batches.remove(&partition).expect("listed above");
                    flush(&archive, &consumer, batch, faults, &telemetry, &mut outcome).await?;
                }
                if !args.follow {
                    // Gaps at the end (transaction markers) never arrive as
                    // records; the consumer's position says it is past them.
                    let positions = consumer.position().context("cannot read the consumer's position")?;
                    for element in positions.elements() {
                        if let (Offset::Offset(position), Some(end)) = (element.offset(), ends.get(&element.partition())) {
                            if position >= *end && done.insert(element.partition()) {
                                if let Some(batch) = batches.remove(&element.partition()) {
                                    flush(&archive, &consumer, batch, faults, &telemetry, &mut outcome).await?;
                                }
                            }
                        }
                    }
                }
            }
            message = consumer.recv() => {
                let message = message.with_context(|| format!("cannot read {dlq_topic}"))?;
                let record = ReadRecord::from_message(&message);
                drop(message);
                let partition = record.partition;
                if !args.follow && done.contains(&partition) {
                    continue;
                }
                let folder = hour_folder(filed_at(&record));
                if batches.get(&partition).is_some_and(|batch| batch.folder != folder) {
                    let batch = batches.remove(&partition).expect("checked above");
                    flush(&archive, &consumer, batch, faults, &telemetry, &mut outcome).await?;
                }
                let batch = batches
                    .entry(partition)
                    .or_insert_with(|| Batch::open(&dlq_topic, &record));
                batch.add(&record)?;
                let full = batch.lines.len() as u64 >= args.max_batch_bytes
                    || batch.records >= args.max_batch_records;
                let at_end = !args.follow
                    && ends.get(&partition).is_some_and(|end| record.offset + 1 >= *end);
                if full || at_end {
                    let batch = batches.remove(&partition).expect("added above");
                    flush(&archive, &consumer, batch, faults, &telemetry, &mut outcome).await?;
                }
                if at_end {
                    done.insert(partition);
                }
            }
        }
    }
    for (_, batch) in std::mem::take(&mut batches) {
        flush(&archive, &consumer, batch, faults, &telemetry, &mut outcome).await?;
    }
    telemetry.holding(&batches);
    commit_progress(&consumer, &dlq_topic, &outcome.archived_next);
    println!(
        "archived {} dead letters in {} objects",
        outcome.records, outcome.objects
    );
    Ok(outcome)
}

async fn flush(
    archive: &Archive,
    consumer: &StreamConsumer,
    batch: Batch,
    faults: &Faults,
    telemetry: &Telemetry,
    outcome: &mut ArchiveOutcome,
) -> anyhow::Result<()> {
    let manifest = archive.write(&batch, faults).await?;
    telemetry.written(&manifest);
    println!(
        "{}/{} offsets {}..={}: {} dead letters, {} bytes gzip -> s3://{}/{}",
        manifest.dlq_topic,
        manifest.dlq_partition,
        manifest.first_offset,
        manifest.last_offset,
        manifest.records,
        manifest.compressed_bytes,
        archive.bucket(),
        manifest.object
    );
    outcome.objects += 1;
    outcome.records += manifest.records;
    outcome
        .archived_next
        .insert(manifest.dlq_partition, manifest.last_offset + 1);
    let mut committed = TopicPartitionList::new();
    committed.add_partition_offset(
        &manifest.dlq_topic,
        manifest.dlq_partition,
        Offset::Offset(manifest.last_offset + 1),
    )?;
    // Only for `streamctl lag`; a lost commit costs nothing (the manifests
    // say where to resume).
    if let Err(error) = consumer.commit(&committed, CommitMode::Async) {
        warn!(%error, "cannot commit the archiver's progress to its group");
    }
    Ok(())
}

/// Commits where the archive ends to the archiver's group and waits for the
/// broker's answer: at the end of a run, so the group shows the archive's
/// end even when an earlier run's asynchronous commits were lost.
fn commit_progress(consumer: &StreamConsumer, dlq_topic: &str, next: &BTreeMap<i32, i64>) {
    let mut committed = TopicPartitionList::new();
    for (partition, offset) in next.iter().filter(|(_, offset)| **offset > 0) {
        if let Err(error) =
            committed.add_partition_offset(dlq_topic, *partition, Offset::Offset(*offset))
        {
            warn!(%error, "cannot commit the archiver's progress to its group");
            return;
        }
    }
    if committed.count() == 0 {
        return;
    }
    if let Err(error) = consumer.commit(&committed, CommitMode::Sync) {
        warn!(%error, "cannot commit the archiver's progress to its group");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(offset: i64, payload: &[u8], timestamp_ms: Option<i64>) -> ReadRecord {
        ReadRecord {
            partition: 2,
            offset,
            key: Some(b"user-7".to_vec()),
            payload: Some(payload.to_vec()),
            headers: vec![
                ("dlq.error.type".into(), "malformed_json".into()),
                ("dlq.source.topic".into(), "events".into()),
                ("dlq.source.partition".into(), "4".into()),
                ("dlq.source.offset".into(), format!("{}", 100 + offset)),
            ],
            timestamp_ms,
        }
    }

    fn archive() -> Archive {
        S3Args {
            s3_endpoint: "http://127.0.0.1:4566".into(),
            s3_region: "us-east-1".into(),
            s3_access_key_id: "test".into(),
            s3_secret_access_key: "test".into(),
            archive_bucket: "dead-letters".into(),
            archive_prefix: "prod".into(),
        }
        .archive()
        .unwrap()
    }

    #[test]
    fn text_and_binary_payloads_come_back_byte_for_byte() {
        for payload in [&b"{\"broken\":"[..], &[0xff, 0x00, 0xc3, 0x28][..], b""] {
            let original = record(5, payload, Some(1_764_000_000_000));
            let archived = ArchivedRecord::from_read("events.dlq", &original);
            let line = serde_json::to_string(&archived).unwrap();
            let back: ArchivedRecord = serde_json::from_str(&line).unwrap();
            let read = back.to_read().unwrap();
            assert_eq!(read.payload, original.payload);
            assert_eq!(read.key, original.key);
            assert_eq!(read.headers.len(), original.headers.len());
            assert_eq!(read.header("dlq.source.offset"), Some("105"));
        }
        let binary = ArchivedRecord::from_read("events.dlq", &record(0, &[0xff, 0xfe], None));
        assert_eq!(binary.payload_encoding, Encoding::Base64);
        assert_eq!(binary.payload.as_deref(), Some("//4="));
        let text = ArchivedRecord::from_read("events.dlq", &record(0, b"hi", None));
        assert_eq!(text.payload_encoding, Encoding::Utf8);
    }

    #[test]
    fn names_come_from_positions_and_the_first_timestamp() {
        let archive = archive();
        // 2026-12-03T10:15:00Z
        let at = Some(1_796_292_900_000);
        assert_eq!(hour_folder(at), "dt=2026-12-03/hr=10");
        assert_eq!(hour_folder(None), "dt=unknown/hr=unknown");
        assert_eq!(
            archive.object_key("events.dlq", 3, 1234, at),
            "prod/events.dlq/dt=2026-12-03/hr=10/events.dlq+3+00000000000000001234.jsonl.gz"
        );
        assert_eq!(
            archive.manifest_key("events.dlq", 3, 1234),
            "prod/events.dlq/_manifests/partition=3/00000000000000001234.json"
        );
        // Keys sort by offset, so the last manifest listed is the newest.
        assert!(
            archive.manifest_key("events.dlq", 3, 999)
                < archive.manifest_key("events.dlq", 3, 1000)
        );
    }

    #[test]
    fn a_batch_counts_error_types_and_source_ranges() {
        let mut batch = Batch::open("events.dlq", &record(7, b"x", Some(1)));
        for offset in [7, 8, 9] {
            batch.add(&record(offset, b"x", Some(1))).unwrap();
        }
        assert_eq!(
            (batch.first_offset, batch.last_offset, batch.records),
            (7, 9, 3)
        );
        assert_eq!(batch.by_error_type["malformed_json"], 3);
        assert_eq!(batch.source_offsets["events/4"], (107, 109));
        assert_eq!(batch.lines.iter().filter(|byte| **byte == b'\n').count(), 3);
    }

    #[test]
    fn bad_settings_name_the_flag() {
        let mut args = S3Args {
            s3_endpoint: "127.0.0.1:4566".into(),
            s3_region: "us-east-1".into(),
            s3_access_key_id: "test".into(),
            s3_secret_access_key: "test".into(),
            archive_bucket: "dead-letters".into(),
            archive_prefix: String::new(),
        };
        assert!(args
            .archive()
            .unwrap_err()
            .to_string()
            .contains("--s3-endpoint"));
        args.s3_endpoint = "http://127.0.0.1:4566".into();
        args.archive_bucket = "Dead_Letters".into();
        assert!(args
            .archive()
            .unwrap_err()
            .to_string()
            .contains("--archive-bucket"));
    }
}
