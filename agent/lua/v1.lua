-- mqtt-affinity: read-through of layout version 1 (shared by decide.lua and migrate.lua).
--
-- Version 1 kept one HASH per client with a TTL on the key: P owner:<cid> {node, placed_at, by}
-- and P pin:<cid> {node, reason, created_at}. v1_import moves one such key into the client's
-- bucket, unless the bucket already has a record for the client (it is newer), and deletes it.
-- third/fourth name the old fields that become the record's last two fields.
local function v1_import(key, bucket, cid, now, third, fourth)
  if not key or redis.call('EXISTS', key) == 0 then return 0 end
  local moved = 0
  if redis.call('HEXISTS', bucket, cid) == 0 then
    local f = redis.call('HMGET', key, 'node', third, fourth)
    if f[1] then
      local pttl = redis.call('PTTL', key)
      local exp = NEVER
      if pttl > 0 then exp = now + math.ceil(pttl / 1000) end
      redis.call('HSET', bucket, cid, f[1] .. SEP .. exp .. SEP .. (f[2] or now) .. SEP .. (f[3] or ''))
      moved = 1
    end
  end
  redis.call('DEL', key)
  return moved
end
