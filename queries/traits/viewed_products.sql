-- Unique list and its count in a window: products viewed in the 30 days before as-of.
-- DISTINCT in a subquery, then array_sort(array_agg(..)): the fast form. (array_agg with its
-- own DISTINCT or ORDER BY keeps one accumulator object per profile; see README "Performance".)
SELECT profile_id,
       array_sort(array_agg(product_id)) AS viewed_products_30d,
       count(*) AS viewed_product_count_30d
FROM (
    SELECT DISTINCT profile_id, json_get_str(properties, 'product_id') AS product_id
    FROM events
    WHERE event = 'Product Viewed' AND "timestamp" >= as_of() - INTERVAL '30 days'
)
WHERE product_id IS NOT NULL
GROUP BY profile_id
