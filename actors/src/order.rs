//! Orders: what the SQS consumer stores. Pure parsing, like [`crate::parse`].

use serde::Deserialize;
use uuid::Uuid;

/// A valid order.
#[derive(Debug, Clone, PartialEq)]
pub struct Order {
    /// Idempotency key: one row per order.
    pub order_id: Uuid,
    /// Who ordered.
    pub customer_id: String,
    /// Positive amount.
    pub amount: f64,
    /// ISO currency code, three letters.
    pub currency: String,
}

#[derive(Deserialize)]
struct WireOrder {
    order_id: Uuid,
    customer_id: String,
    amount: f64,
    currency: String,
}

/// Parses an order message body; the error says what is wrong.
pub fn parse_order(body: &str) -> Result<Order, String> {
    let wire: WireOrder =
        serde_json::from_str(body).map_err(|error| format!("not an order: {error}"))?;
    if !(wire.amount.is_finite() && wire.amount > 0.0) {
        return Err(format!("amount must be positive, got {}", wire.amount));
    }
    if wire.currency.len() != 3
        || !wire
            .currency
            .chars()
            .all(|letter| letter.is_ascii_uppercase())
    {
        return Err(format!(
            "currency must be three capital letters, got {:?}",
            wire.currency
        ));
    }
    Ok(Order {
        order_id: wire.order_id,
        customer_id: wire.customer_id,
        amount: wire.amount,
        currency: wire.currency,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn valid_and_poison_orders() {
        let valid = r#"{"order_id":"6f1c2a4e-8b7d-4c1e-9f3a-2b5d8e7c9a01","customer_id":"c-1","amount":9.5,"currency":"EUR"}"#;
        assert_eq!(parse_order(valid).unwrap().amount, 9.5);
        assert!(parse_order("{").is_err());
        assert!(parse_order(&valid.replace("9.5", "-1")).is_err());
        assert!(parse_order(&valid.replace("EUR", "euro")).is_err());
        assert!(parse_order(&valid.replace("\"order_id\"", "\"id\"")).is_err());
    }
}
