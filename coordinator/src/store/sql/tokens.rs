//! API tokens, join tokens and agent credentials: one table, secrets stored as hashes.

use async_trait::async_trait;
use sqlx::Row;
use sqlx::any::AnyRow;

use super::SqlStore;
use crate::error::{Error, Result};
use crate::store::{TokenRecord, TokenStore};

const TOKEN_SELECT: &str = "SELECT id, name, role, secret_sha256, agent_id, uses_left, created_at, \
     expires_at, revoked_at, last_used_at, next_secret_sha256 FROM tokens";

fn token_record(row: &AnyRow) -> Result<TokenRecord> {
    Ok(TokenRecord {
        id: row.try_get(0)?,
        name: row.try_get(1)?,
        role: row.try_get(2)?,
        secret_sha256: row.try_get(3)?,
        agent_id: row.try_get(4)?,
        uses_left: row.try_get(5)?,
        created_at: row.try_get(6)?,
        expires_at: row.try_get(7)?,
        revoked_at: row.try_get(8)?,
        last_used_at: row.try_get(9)?,
        next_secret_sha256: row.try_get(10)?,
    })
}

fn insert(t: &TokenRecord) -> sqlx::query::Query<'_, sqlx::Any, sqlx::any::AnyArguments<'_>> {
    sqlx::query(
        "INSERT INTO tokens (id, name, role, secret_sha256, agent_id, uses_left, created_at, \
         expires_at, revoked_at, last_used_at) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)",
    )
    .bind(&t.id)
    .bind(&t.name)
    .bind(&t.role)
    .bind(&t.secret_sha256)
    .bind(&t.agent_id)
    .bind(t.uses_left)
    .bind(t.created_at)
    .bind(t.expires_at)
    .bind(t.revoked_at)
    .bind(t.last_used_at)
}

#[async_trait]
impl TokenStore for SqlStore {
    async fn insert_token(&self, t: &TokenRecord) -> Result<()> {
        let _writer = self.writer().await;
        let taken = sqlx::query("SELECT 1 FROM tokens WHERE name = $1")
            .bind(&t.name)
            .fetch_optional(&self.pool)
            .await?;
        if taken.is_some() {
            return Err(Error::AlreadyExists(format!(
                "a token named '{}' exists (revoked tokens keep their names, for the record); pick another name",
                t.name
            )));
        }
        insert(t).execute(&self.pool).await?;
        Ok(())
    }

    async fn get_token(&self, id: &str) -> Result<Option<TokenRecord>> {
        let sql = format!("{TOKEN_SELECT} WHERE id = $1");
        let row = sqlx::query(&sql)
            .bind(id)
            .fetch_optional(&self.pool)
            .await?;
        row.as_ref().map(token_record).transpose()
    }

    async fn token_by_name(&self, name: &str) -> Result<Option<TokenRecord>> {
        let sql = format!("{TOKEN_SELECT} WHERE name = $1");
        let row = sqlx::query(&sql)
            .bind(name)
            .fetch_optional(&self.pool)
            .await?;
        row.as_ref().map(token_record).transpose()
    }

    async fn list_tokens(&self) -> Result<Vec<TokenRecord>> {
        let sql = format!("{TOKEN_SELECT} ORDER BY name");
        let rows = sqlx::query(&sql).fetch_all(&self.pool).await?;
        rows.iter().map(token_record).collect()
    }

    async fn revoke_token(&self, id: &str, now: i64) -> Result<()> {
        let _writer = self.writer().await;
        sqlx::query("UPDATE tokens SET revoked_at = $1 WHERE id = $2 AND revoked_at = 0")
            .bind(now)
            .bind(id)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    async fn set_token_secret(&self, id: &str, secret_sha256: &str) -> Result<()> {
        let _writer = self.writer().await;
        sqlx::query("UPDATE tokens SET secret_sha256 = $1 WHERE id = $2")
            .bind(secret_sha256)
            .bind(id)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    async fn use_token(&self, id: &str, now: i64, consume: bool) -> Result<bool> {
        let _writer = self.writer().await;
        let done = if consume {
            // One use of a limited join token, taken atomically: two agents cannot share the last.
            sqlx::query(
                "UPDATE tokens SET uses_left = CASE WHEN uses_left > 0 THEN uses_left - 1 ELSE uses_left END, \
                 last_used_at = $1 WHERE id = $2 AND uses_left <> 0",
            )
        } else {
            sqlx::query("UPDATE tokens SET last_used_at = $1 WHERE id = $2")
        }
        .bind(now)
        .bind(id)
        .execute(&self.pool)
        .await?;
        Ok(done.rows_affected() == 1)
    }

    async fn replace_agent_credential(&self, t: &TokenRecord) -> Result<()> {
        let (_writer, mut tx) = self.begin().await?;
        sqlx::query("DELETE FROM tokens WHERE agent_id = $1 AND role = 'agent'")
            .bind(&t.agent_id)
            .execute(&mut *tx)
            .await?;
        insert(t).execute(&mut *tx).await?;
        tx.commit().await?;
        Ok(())
    }

    async fn offer_token_secret(&self, id: &str, next_sha256: &str) -> Result<()> {
        let _writer = self.writer().await;
        sqlx::query("UPDATE tokens SET next_secret_sha256 = $1 WHERE id = $2")
            .bind(next_sha256)
            .bind(id)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    async fn promote_token_secret(
        &self,
        id: &str,
        next_sha256: &str,
        expires_at: i64,
        now: i64,
    ) -> Result<bool> {
        let _writer = self.writer().await;
        let done = sqlx::query(
            "UPDATE tokens SET secret_sha256 = next_secret_sha256, next_secret_sha256 = '', \
             expires_at = $1 WHERE id = $2 AND next_secret_sha256 = $3 AND next_secret_sha256 <> '' \
             AND revoked_at = 0 AND (expires_at = 0 OR expires_at > $4)",
        )
        .bind(expires_at)
        .bind(id)
        .bind(next_sha256)
        .bind(now)
        .execute(&self.pool)
        .await?;
        Ok(done.rows_affected() == 1)
    }

    async fn revoke_agent_credentials(&self, agent_id: &str, now: i64) -> Result<u64> {
        let _writer = self.writer().await;
        let done = sqlx::query(
            "UPDATE tokens SET revoked_at = $1 WHERE agent_id = $2 AND role = 'agent' AND revoked_at = 0",
        )
        .bind(now)
        .bind(agent_id)
        .execute(&self.pool)
        .await?;
        Ok(done.rows_affected())
    }
}
