-- Retargeting: in the last 14 days went product view -> add to cart -> checkout, each step
-- within 3 days of the one before, and stopped there: no order after the last checkout.
SELECT profile_id, last_checkout_at
FROM (
    SELECT profile_id,
           funnel(INTERVAL '3 days', "timestamp",
                  event = 'Product Viewed', event = 'Product Added',
                  event = 'Checkout Started', event = 'Order Completed') AS furthest_step,
           max("timestamp") FILTER (WHERE event = 'Checkout Started') AS last_checkout_at,
           max("timestamp") FILTER (WHERE event = 'Order Completed') AS last_order_at
    FROM events
    WHERE profile_id IS NOT NULL
      AND "timestamp" >= as_of() - INTERVAL '14 days'
      AND event IN ('Product Viewed', 'Product Added', 'Checkout Started', 'Order Completed')
    GROUP BY profile_id
) journeys
WHERE furthest_step = 3
  AND (last_order_at IS NULL OR last_order_at < last_checkout_at)
