//! `tessera serve`: the published tables over Arrow Flight SQL, for BI tools and notebooks.
//!
//! A BI tool connects once and asks many questions; it must see whole runs only, never a table
//! from one run beside another from the next. So every answer is read from one *snapshot*: the
//! tables at the versions the last succeeded run pinned in its `runs` row, registered in a
//! context of their own. Before each request the server lists the `runs` table's log (one
//! listing); when a newer run has been published since, it builds a new snapshot. Requests
//! already running keep the snapshot they started with. SQL goes through the same read-only
//! check as `tessera query` ([`crate::engine::check_read_only`] and
//! [`crate::engine::read_only`]): one SELECT, no DDL, DML, COPY or SET.
//!
//! Statements are stateless on the server: a ticket and a prepared statement's handle carry the
//! SQL itself, so nothing is kept per client and a restarted server answers old tickets.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;

use arrow::datatypes::{Schema, SchemaRef};
use arrow::record_batch::RecordBatch;
use arrow_flight::encode::FlightDataEncoderBuilder;
use arrow_flight::error::FlightError;
use arrow_flight::flight_service_server::{FlightService, FlightServiceServer};
use arrow_flight::sql::metadata::{SqlInfoData, SqlInfoDataBuilder};
use arrow_flight::sql::server::{FlightSqlService, PeekableFlightDataStream};
use arrow_flight::sql::{
    ActionClosePreparedStatementRequest, ActionCreatePreparedStatementRequest,
    ActionCreatePreparedStatementResult, Any, CommandGetCatalogs, CommandGetDbSchemas,
    CommandGetSqlInfo, CommandGetTableTypes, CommandGetTables, CommandPreparedStatementQuery,
    CommandStatementQuery, DoPutPreparedStatementResult, ProstMessageExt, SqlInfo,
    TicketStatementQuery,
};
use arrow_flight::{
    Action, FlightDescriptor, FlightEndpoint, FlightInfo, HandshakeRequest, HandshakeResponse,
    IpcMessage, SchemaAsIpc, Ticket,
};
use datafusion::prelude::SessionContext;
use futures::{Stream, StreamExt, TryStreamExt};
use prost::Message;
use tonic::{Request, Response, Status, Streaming};

use crate::config::Project;
use crate::engine::Engine;
use crate::error::{Error, Result};
use crate::output::Committed;
use crate::tables;

/// The schema the contract tables are listed under; segments and reports have their own.
const MAIN_SCHEMA: &str = "public";
/// The catalog every table is in (DataFusion's default).
const CATALOG: &str = "datafusion";

/// The published tables as one run left them, ready to query.
struct Snapshot {
    /// The `runs` table's Delta version this snapshot was built at (`None`: no run yet).
    runs_version: Option<u64>,
    /// A context holding exactly these tables.
    ctx: SessionContext,
    /// (schema, table) of every table served, sorted.
    tables: Vec<(String, String)>,
}

/// The Flight SQL service.
pub struct Server {
    engine: Engine,
    snapshot: tokio::sync::Mutex<Arc<Snapshot>>,
    info: SqlInfoData,
}

/// Serves `project`'s published tables on `bind` until interrupted.
///
/// Bound beyond loopback, a `token` is required: anyone who can reach the port could otherwise
/// read every profile. Clients send it as `authorization: Bearer <token>` on every call.
pub async fn serve(project: Project, bind: &str, token: Option<String>) -> Result<()> {
    let address: SocketAddr = bind.parse().map_err(|e| Error::Serve {
        bind: bind.to_string(),
        message: format!("not an address to listen on ({e}); write IP:PORT, e.g. 127.0.0.1:50051"),
    })?;
    let token = token.filter(|t| !t.is_empty());
    if token.is_none() && !address.ip().is_loopback() {
        return Err(Error::Serve {
            bind: bind.to_string(),
            message: "listening beyond this machine needs a token, or anyone who reaches the port reads every profile: pass --token (or set TESSERA_SERVE_TOKEN), or bind to 127.0.0.1".into(),
        });
    }
    let engine = Engine::open(project).await?;
    let server = Server::new(engine).await?;
    let listener = tokio::net::TcpListener::bind(address)
        .await
        .map_err(|e| Error::Serve {
            bind: bind.to_string(),
            message: format!("cannot listen: {e}"),
        })?;
    let local = listener.local_addr().map_err(|e| Error::io(bind, e))?;
    // The test harness and scripts read this line to learn the port (`--bind 127.0.0.1:0`).
    println!("serving Flight SQL on grpc://{local}");
    tracing::info!(address = %local, auth = token.is_some(), "serving Flight SQL");
    let service = FlightServiceServer::with_interceptor(server, move |request: Request<()>| {
        check_token(token.as_deref(), &request)?;
        Ok(request)
    });
    let incoming = tokio_stream_of(listener);
    tonic::transport::Server::builder()
        .add_service(service)
        .serve_with_incoming_shutdown(incoming, async {
            let _ = tokio::signal::ctrl_c().await;
        })
        .await
        .map_err(|e| Error::Serve {
            bind: bind.to_string(),
            message: format!("the server stopped: {e}"),
        })
}

/// The accepted connections of `listener` as the stream tonic serves.
fn tokio_stream_of(
    listener: tokio::net::TcpListener,
) -> impl Stream<Item = std::io::Result<tokio::net::TcpStream>> {
    futures::stream::unfold(listener, |listener| async move {
        let next = listener.accept().await.map(|(socket, _)| socket);
        Some((next, listener))
    })
}

/// Refuses a call without `authorization: Bearer <token>` when a token is configured.
fn check_token(token: Option<&str>, request: &Request<()>) -> std::result::Result<(), Status> {
    let Some(token) = token else {
        return Ok(());
    };
    let sent = request
        .metadata()
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| {
            v.strip_prefix("Bearer ")
                .or_else(|| v.strip_prefix("bearer "))
        })
        .unwrap_or("");
    // Compared in full whatever the first difference, so timing does not reveal a prefix.
    let same = sent.len() == token.len()
        && sent
            .bytes()
            .zip(token.bytes())
            .fold(0u8, |acc, (a, b)| acc | (a ^ b))
            == 0;
    if same {
        Ok(())
    } else {
        Err(Status::unauthenticated(
            "this server needs a token: send `authorization: Bearer <token>` (ADBC: adbc.flight.sql.authorization_header)",
        ))
    }
}

fn status(e: impl std::fmt::Display) -> Status {
    Status::internal(e.to_string())
}

/// A user's SQL that cannot run: their mistake, said as `tessera query` would.
fn invalid(e: Error) -> Status {
    Status::invalid_argument(e.to_string())
}

/// The latest version of the `runs` table, from one listing of its log; `None` before any run.
async fn runs_version(engine: &Engine) -> Result<Option<u64>> {
    let place = engine.outputs.place();
    let log = place.child(tables::RUNS).join("_delta_log");
    let mut listing = place.store.list(Some(&log));
    let mut latest = None;
    while let Some(meta) = listing.next().await {
        let meta = match meta {
            Ok(meta) => meta,
            Err(object_store::Error::NotFound { .. }) => break,
            Err(e) => return Err(e.into()),
        };
        let version = meta
            .location
            .filename()
            .and_then(|n| n.strip_suffix(".json"))
            .and_then(|n| n.parse::<u64>().ok());
        latest = latest.max(version);
    }
    Ok(latest)
}

/// Where a published table is served: (schema, table), or `None` for tables kept out of
/// sight (Tessera's own `_state` bookkeeping; the event history is served as `events`).
fn served_name(published: &str) -> Option<(String, String)> {
    if published == tables::state::EVENTS {
        return Some((MAIN_SCHEMA.into(), tables::EVENTS.into()));
    }
    if published.starts_with("_state/") {
        return None;
    }
    match published.split_once('/') {
        Some((folder, name)) => Some((folder.to_string(), name.to_string())),
        None => Some((MAIN_SCHEMA.to_string(), published.to_string())),
    }
}

impl Server {
    async fn new(engine: Engine) -> Result<Server> {
        let mut info = SqlInfoDataBuilder::new();
        info.append(SqlInfo::FlightSqlServerName, "Tessera");
        info.append(SqlInfo::FlightSqlServerVersion, env!("CARGO_PKG_VERSION"));
        info.append(SqlInfo::FlightSqlServerArrowVersion, "1.3");
        info.append(SqlInfo::FlightSqlServerReadOnly, true);
        info.append(SqlInfo::FlightSqlServerSql, true);
        info.append(SqlInfo::FlightSqlServerSubstrait, false);
        // 0: SQL_SUPPORTED_TRANSACTION_NONE; every answer reads one published run anyway.
        info.append(SqlInfo::FlightSqlServerTransaction, 0i32);
        info.append(SqlInfo::FlightSqlServerCancel, false);
        info.append(SqlInfo::SqlIdentifierQuoteChar, "\"");
        let info = info.build().map_err(|e| Error::Internal(e.to_string()))?;
        let snapshot = Arc::new(Self::snapshot(&engine, runs_version(&engine).await?).await?);
        Ok(Server {
            engine,
            snapshot: tokio::sync::Mutex::new(snapshot),
            info,
        })
    }

    /// The tables as the last succeeded run published them, in a context of their own.
    async fn snapshot(engine: &Engine, runs_version: Option<u64>) -> Result<Snapshot> {
        let ctx = crate::engine::new_context_with(&engine.limits)?;
        engine.outputs.place().register(&ctx);
        let mut served = Vec::new();
        let catalog = ctx
            .catalog(CATALOG)
            .ok_or_else(|| Error::Internal("the default catalog is missing".into()))?;
        for folder in [tables::SEGMENTS, tables::REPORTS] {
            catalog.register_schema(
                folder,
                Arc::new(datafusion::catalog::MemorySchemaProvider::new()),
            )?;
        }
        if let Some(version) = runs_version {
            if let Some(runs) = engine
                .outputs
                .provider_at(&ctx, tables::RUNS, Some(version))
                .await?
            {
                ctx.register_table(tables::RUNS, runs)?;
                served.push((MAIN_SCHEMA.to_string(), tables::RUNS.to_string()));
                for (name, committed) in pinned(&ctx).await? {
                    let Some((schema, table)) = served_name(&name) else {
                        continue;
                    };
                    let Some(provider) = engine
                        .outputs
                        .provider_at(&ctx, &name, Some(committed.version))
                        .await?
                    else {
                        continue;
                    };
                    let reference = datafusion::common::TableReference::partial(
                        schema.as_str(),
                        table.as_str(),
                    );
                    ctx.register_table(reference, provider)?;
                    served.push((schema, table));
                }
            }
        }
        served.sort();
        tracing::info!(runs_version = ?runs_version, tables = served.len(), "serving a published run");
        Ok(Snapshot {
            runs_version,
            ctx,
            tables: served,
        })
    }

    /// The snapshot to answer from: the current one, or a new one if a run was published since.
    async fn current(&self) -> std::result::Result<Arc<Snapshot>, Status> {
        let latest = runs_version(&self.engine).await.map_err(status)?;
        let mut held = self.snapshot.lock().await;
        if held.runs_version != latest {
            *held = Arc::new(Self::snapshot(&self.engine, latest).await.map_err(status)?);
        }
        Ok(held.clone())
    }

    /// Plans `sql` through the read-only check.
    async fn plan(
        snapshot: &Snapshot,
        sql: &str,
    ) -> std::result::Result<datafusion::prelude::DataFrame, Status> {
        crate::engine::check_read_only(&snapshot.ctx, sql, "<flight sql>").map_err(invalid)?;
        let df = snapshot
            .ctx
            .sql_with_options(sql, crate::engine::read_only())
            .await
            .map_err(|e| invalid(Error::query_failed("<flight sql>", e)))?;
        // String views and other newer types as plain ones: what every BI driver reads.
        crate::output::plain_columns(df).map_err(invalid)
    }

    /// A FlightInfo whose one endpoint's ticket is `ticket`, for a result of `schema`.
    fn info(
        schema: &Schema,
        ticket: Vec<u8>,
        descriptor: FlightDescriptor,
    ) -> std::result::Result<Response<FlightInfo>, Status> {
        let endpoint = FlightEndpoint::new().with_ticket(Ticket::new(ticket));
        let info = FlightInfo::new()
            .try_with_schema(schema)
            .map_err(status)?
            .with_endpoint(endpoint)
            .with_descriptor(descriptor);
        Ok(Response::new(info))
    }

    /// Runs `sql` and streams its batches.
    async fn stream(
        &self,
        sql: &str,
    ) -> std::result::Result<Response<<Self as FlightService>::DoGetStream>, Status> {
        let snapshot = self.current().await?;
        let df = Self::plan(&snapshot, sql).await?;
        let schema: SchemaRef = Arc::new(df.schema().as_arrow().clone());
        let batches = df
            .execute_stream()
            .await
            .map_err(|e| invalid(Error::query_failed("<flight sql>", e)))?
            .map_err(|e| FlightError::ExternalError(Box::new(e)));
        let stream = FlightDataEncoderBuilder::new()
            .with_schema(schema)
            .build(batches)
            .map_err(Status::from);
        Ok(Response::new(Box::pin(stream)))
    }

    /// One batch as a DoGet answer.
    fn one_batch<E: std::fmt::Display>(
        batch: std::result::Result<RecordBatch, E>,
        schema: SchemaRef,
    ) -> std::result::Result<Response<<Self as FlightService>::DoGetStream>, Status> {
        let batch = batch.map_err(status)?;
        let stream = FlightDataEncoderBuilder::new()
            .with_schema(schema)
            .build(futures::stream::once(async { Ok(batch) }))
            .map_err(Status::from);
        Ok(Response::new(Box::pin(stream)))
    }
}

/// The tables and versions the last succeeded run recorded in `runs` (registered in `ctx`).
async fn pinned(ctx: &SessionContext) -> Result<BTreeMap<String, Committed>> {
    use arrow::array::AsArray;
    let batches = ctx
        .sql("SELECT CAST(tables AS VARCHAR) AS tables FROM runs WHERE status = 'succeeded' ORDER BY started_at DESC LIMIT 1")
        .await?
        .collect()
        .await?;
    let Some(batch) = batches.iter().find(|b| b.num_rows() > 0) else {
        return Ok(BTreeMap::new());
    };
    let text = batch.column(0).as_string::<i32>().value(0);
    serde_json::from_str(text).map_err(|e| {
        Error::Internal(format!(
            "the last run's `tables` in `runs` is not the JSON Tessera writes: {e}"
        ))
    })
}

fn schema_ipc(schema: &Schema) -> std::result::Result<bytes::Bytes, Status> {
    let options = arrow::ipc::writer::IpcWriteOptions::default();
    let IpcMessage(bytes) = SchemaAsIpc::new(schema, &options)
        .try_into()
        .map_err(status)?;
    Ok(bytes)
}

fn handle_sql(handle: &[u8]) -> std::result::Result<&str, Status> {
    std::str::from_utf8(handle)
        .map_err(|_| Status::invalid_argument("not a handle this server gave"))
}

#[tonic::async_trait]
impl FlightSqlService for Server {
    type FlightService = Server;

    async fn do_handshake(
        &self,
        _request: Request<Streaming<HandshakeRequest>>,
    ) -> std::result::Result<
        Response<
            Pin<Box<dyn Stream<Item = std::result::Result<HandshakeResponse, Status>> + Send>>,
        >,
        Status,
    > {
        // The token (if any) was checked before this call reached the service; there is no
        // session to set up.
        let reply = HandshakeResponse {
            protocol_version: 0,
            payload: Default::default(),
        };
        Ok(Response::new(Box::pin(futures::stream::once(async {
            Ok(reply)
        }))))
    }

    async fn get_flight_info_statement(
        &self,
        query: CommandStatementQuery,
        request: Request<FlightDescriptor>,
    ) -> std::result::Result<Response<FlightInfo>, Status> {
        let snapshot = self.current().await?;
        let df = Self::plan(&snapshot, &query.query).await?;
        let ticket = TicketStatementQuery {
            statement_handle: query.query.into_bytes().into(),
        };
        Self::info(
            df.schema().as_arrow(),
            ticket.as_any().encode_to_vec(),
            request.into_inner(),
        )
    }

    async fn do_get_statement(
        &self,
        ticket: TicketStatementQuery,
        _request: Request<Ticket>,
    ) -> std::result::Result<Response<<Self as FlightService>::DoGetStream>, Status> {
        let sql = handle_sql(&ticket.statement_handle)?.to_string();
        self.stream(&sql).await
    }

    async fn do_action_create_prepared_statement(
        &self,
        query: ActionCreatePreparedStatementRequest,
        _request: Request<Action>,
    ) -> std::result::Result<ActionCreatePreparedStatementResult, Status> {
        let snapshot = self.current().await?;
        let df = Self::plan(&snapshot, &query.query).await?;
        Ok(ActionCreatePreparedStatementResult {
            prepared_statement_handle: query.query.into_bytes().into(),
            dataset_schema: schema_ipc(df.schema().as_arrow())?,
            parameter_schema: schema_ipc(&Schema::empty())?,
        })
    }

    async fn do_action_close_prepared_statement(
        &self,
        _query: ActionClosePreparedStatementRequest,
        _request: Request<Action>,
    ) -> std::result::Result<(), Status> {
        // Nothing is kept per statement.
        Ok(())
    }

    async fn get_flight_info_prepared_statement(
        &self,
        cmd: CommandPreparedStatementQuery,
        request: Request<FlightDescriptor>,
    ) -> std::result::Result<Response<FlightInfo>, Status> {
        let snapshot = self.current().await?;
        let df = Self::plan(&snapshot, handle_sql(&cmd.prepared_statement_handle)?).await?;
        Self::info(
            df.schema().as_arrow(),
            cmd.as_any().encode_to_vec(),
            request.into_inner(),
        )
    }

    async fn do_get_prepared_statement(
        &self,
        query: CommandPreparedStatementQuery,
        _request: Request<Ticket>,
    ) -> std::result::Result<Response<<Self as FlightService>::DoGetStream>, Status> {
        let sql = handle_sql(&query.prepared_statement_handle)?.to_string();
        self.stream(&sql).await
    }

    async fn do_put_prepared_statement_query(
        &self,
        _query: CommandPreparedStatementQuery,
        _request: Request<PeekableFlightDataStream>,
    ) -> std::result::Result<DoPutPreparedStatementResult, Status> {
        Err(Status::unimplemented(
            "query parameters are not supported: write the values into the SQL",
        ))
    }

    async fn get_flight_info_catalogs(
        &self,
        query: CommandGetCatalogs,
        request: Request<FlightDescriptor>,
    ) -> std::result::Result<Response<FlightInfo>, Status> {
        let schema = query.into_builder().schema();
        Self::info(
            &schema,
            query.as_any().encode_to_vec(),
            request.into_inner(),
        )
    }

    async fn do_get_catalogs(
        &self,
        query: CommandGetCatalogs,
        _request: Request<Ticket>,
    ) -> std::result::Result<Response<<Self as FlightService>::DoGetStream>, Status> {
        let mut builder = query.into_builder();
        builder.append(CATALOG);
        let schema = builder.schema();
        Self::one_batch(builder.build(), schema)
    }

    async fn get_flight_info_schemas(
        &self,
        query: CommandGetDbSchemas,
        request: Request<FlightDescriptor>,
    ) -> std::result::Result<Response<FlightInfo>, Status> {
        let schema = query.clone().into_builder().schema();
        Self::info(
            &schema,
            query.as_any().encode_to_vec(),
            request.into_inner(),
        )
    }

    async fn do_get_schemas(
        &self,
        query: CommandGetDbSchemas,
        _request: Request<Ticket>,
    ) -> std::result::Result<Response<<Self as FlightService>::DoGetStream>, Status> {
        let mut builder = query.into_builder();
        for schema in [MAIN_SCHEMA, tables::SEGMENTS, tables::REPORTS] {
            builder.append(CATALOG, schema);
        }
        let schema = builder.schema();
        Self::one_batch(builder.build(), schema)
    }

    async fn get_flight_info_tables(
        &self,
        query: CommandGetTables,
        request: Request<FlightDescriptor>,
    ) -> std::result::Result<Response<FlightInfo>, Status> {
        let schema = query.clone().into_builder().schema();
        Self::info(
            &schema,
            query.as_any().encode_to_vec(),
            request.into_inner(),
        )
    }

    async fn do_get_tables(
        &self,
        query: CommandGetTables,
        _request: Request<Ticket>,
    ) -> std::result::Result<Response<<Self as FlightService>::DoGetStream>, Status> {
        let snapshot = self.current().await?;
        let include_schema = query.include_schema;
        let mut builder = query.into_builder();
        for (schema, table) in &snapshot.tables {
            let table_schema = if include_schema {
                let reference =
                    datafusion::common::TableReference::partial(schema.as_str(), table.as_str());
                let stored = snapshot
                    .ctx
                    .table_provider(reference)
                    .await
                    .map_err(status)?
                    .schema();
                // The types a query's answer has ([`Server::plan`] makes them plain).
                Schema::new(
                    stored
                        .fields()
                        .iter()
                        .map(|f| tables::plain_field(f))
                        .collect::<Vec<_>>(),
                )
            } else {
                Schema::empty()
            };
            builder
                .append(CATALOG, schema, table, "TABLE", &table_schema)
                .map_err(status)?;
        }
        let schema = builder.schema();
        Self::one_batch(builder.build(), schema)
    }

    async fn get_flight_info_table_types(
        &self,
        query: CommandGetTableTypes,
        request: Request<FlightDescriptor>,
    ) -> std::result::Result<Response<FlightInfo>, Status> {
        Self::info(
            &table_types_schema(),
            query.as_any().encode_to_vec(),
            request.into_inner(),
        )
    }

    async fn do_get_table_types(
        &self,
        _query: CommandGetTableTypes,
        _request: Request<Ticket>,
    ) -> std::result::Result<Response<<Self as FlightService>::DoGetStream>, Status> {
        let schema = Arc::new(table_types_schema());
        let types = arrow::array::StringArray::from(vec!["TABLE"]);
        let batch = RecordBatch::try_new(schema.clone(), vec![Arc::new(types)]);
        Self::one_batch(batch, schema)
    }

    async fn get_flight_info_sql_info(
        &self,
        query: CommandGetSqlInfo,
        request: Request<FlightDescriptor>,
    ) -> std::result::Result<Response<FlightInfo>, Status> {
        let schema = query.clone().into_builder(&self.info).schema();
        Self::info(
            &schema,
            query.as_any().encode_to_vec(),
            request.into_inner(),
        )
    }

    async fn do_get_sql_info(
        &self,
        query: CommandGetSqlInfo,
        _request: Request<Ticket>,
    ) -> std::result::Result<Response<<Self as FlightService>::DoGetStream>, Status> {
        let builder = query.into_builder(&self.info);
        let schema = builder.schema();
        Self::one_batch(builder.build(), schema)
    }

    async fn do_get_fallback(
        &self,
        _request: Request<Ticket>,
        message: Any,
    ) -> std::result::Result<Response<<Self as FlightService>::DoGetStream>, Status> {
        Err(Status::unimplemented(format!(
            "{} is not served: Tessera serves queries and the catalog only",
            message.type_url
        )))
    }

    async fn register_sql_info(&self, _id: i32, _result: &SqlInfo) {}
}

fn table_types_schema() -> Schema {
    Schema::new(vec![arrow::datatypes::Field::new(
        "table_type",
        arrow::datatypes::DataType::Utf8,
        false,
    )])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn served_names_hide_bookkeeping_and_split_folders() {
        assert_eq!(served_name("_state/nodes"), None);
        assert_eq!(
            served_name("_state/events"),
            Some(("public".into(), "events".into()))
        );
        assert_eq!(
            served_name("segments/high_value"),
            Some(("segments".into(), "high_value".into()))
        );
        assert_eq!(
            served_name("profiles"),
            Some(("public".into(), "profiles".into()))
        );
    }

    #[test]
    fn the_token_is_required_exactly() {
        let with = |value: Option<&str>| {
            let mut request = Request::new(());
            if let Some(v) = value {
                request
                    .metadata_mut()
                    .insert("authorization", v.parse().unwrap());
            }
            request
        };
        assert!(check_token(None, &with(None)).is_ok());
        assert!(check_token(Some("s3cret"), &with(Some("Bearer s3cret"))).is_ok());
        assert!(check_token(Some("s3cret"), &with(None)).is_err());
        assert!(check_token(Some("s3cret"), &with(Some("Bearer s3cre"))).is_err());
        assert!(check_token(Some("s3cret"), &with(Some("Basic s3cret"))).is_err());
    }
}
