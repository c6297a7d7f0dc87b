-- Buyers and revenue per RFM segment.
SELECT rfm_segment, count(*) AS buyers,
       sum(monetary) AS revenue,
       avg(recency_days) AS avg_recency_days,
       avg(frequency) AS avg_purchases
FROM rfm
GROUP BY rfm_segment
ORDER BY revenue DESC
