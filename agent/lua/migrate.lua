-- mqtt-affinity: move one version-1 key into its bucket (`mqtt-affinity migrate`).
--
-- KEYS[1]  P owner:<cid> or P pin:<cid>    KEYS[2]  the client's bucket (P{<b>}o or P{<b>}p)
-- ARGV[1]  cid   ARGV[2]  "owner" | "pin"   ARGV[3]  now (unix seconds)
-- Returns 1 when a record moved, 0 when the key was gone or the bucket had a newer record.
-- Safe while agents serve: they run the same import (v1.lua) inside their decisions.
if ARGV[2] == 'owner' then
  return v1_import(KEYS[1], KEYS[2], ARGV[1], tonumber(ARGV[3]), 'placed_at', 'by')
end
return v1_import(KEYS[1], KEYS[2], ARGV[1], tonumber(ARGV[3]), 'created_at', 'reason')
