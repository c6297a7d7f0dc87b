-- Win-back: buyers the BG/NBD model thinks are probably gone (churn risk over 50%) whose
-- predicted 12-month value is in the top quarter of all buyers.
WITH ranked AS (
    SELECT profile_id, churn_risk, clv,
           percent_rank() OVER (ORDER BY clv) AS clv_rank
    FROM predictions
    WHERE clv IS NOT NULL
)
SELECT profile_id, churn_risk, clv
FROM ranked
WHERE churn_risk > 0.5 AND clv_rank >= 0.75
