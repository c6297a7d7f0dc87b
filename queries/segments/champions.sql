-- Recent, frequent buyers: the RFM "Champions".
SELECT profile_id, rfm_score, monetary
FROM rfm
WHERE rfm_segment = 'Champions'
