-- fill: write the loaded entry only while the key still holds the caller's
-- lease (and, in a namespace, while the generation is the one the load
-- started under). An Invalidate (DEL/UNLINK), a Set, a namespace bump, or an
-- expired lease re-taken by another caller all break that, and the late fill
-- is refused.
-- KEYS[1]  the entry key
-- KEYS[2]  the namespace generation key (namespaced caches only)
-- ARGV[1]  the caller's 16-byte lease token
-- ARGV[2]  the entry to write (value or tombstone, carrying its generation)
-- ARGV[3]  its lifetime in milliseconds
-- ARGV[4]  lifetime of the generation key in milliseconds (namespaced caches)
-- ARGV[5]  the channel that wakes waiters, or "": when the lease was marked
--          contended (acquire.lua), "<len(key)>:<key><proof><entry>" is
--          published there after the write (proof and entry left out past
--          64 KiB), so the waiters have their answer without another round
--          trip. With "" (sharded pub/sub, which a script cannot reach
--          across slots) the reply says so and the caller publishes
-- ARGV[6]  the lease's 16-byte proof: the token is the first 16 bytes of
--          its SHA-256, so a waiter can check that the message comes from
--          the holder (a reader of the key sees the token, not the proof)
-- Returns 1 when written (or already written by a retry of this call), 2
-- when written for a contended lease and nothing was published (ARGV[5]
-- ""), else 0.
local cur = redis.pcall('GET', KEYS[1])
if type(cur) ~= 'string' or #cur < 40 or string.sub(cur, 1, 2) ~= string.sub(ARGV[2], 1, 2)
    or string.sub(cur, 5, 20) ~= ARGV[1] then
  return 0
end
if #KEYS > 1 then
  local gen = redis.pcall('GET', KEYS[2])
  if type(gen) ~= 'string' or gen ~= string.sub(ARGV[2], 33, 40) then
    return 0
  end
  redis.call('PEXPIRE', KEYS[2], ARGV[4])
end
local kind = string.byte(cur, 3)
if kind == 3 or kind == 4 then
  redis.call('SET', KEYS[1], ARGV[2], 'PX', ARGV[3])
  if kind == 3 and string.sub(cur, 29, 32) ~= '\0\0\0\0' then
    if ARGV[5] == '' then
      return 2
    end
    local msg = #KEYS[1] .. ':' .. KEYS[1]
    if #ARGV[2] <= 65536 and ARGV[6] ~= nil and #ARGV[6] == 16 then
      msg = msg .. ARGV[6] .. ARGV[2]
    end
    -- pcall: a server that refuses PUBLISH (renamed, ACL) must not fail
    -- the fill that has just been written; the waiters poll instead.
    redis.pcall('PUBLISH', ARGV[5], msg)
  end
  return 1
end
if cur == ARGV[2] then
  return 1
end
return 0
