-- release: drop the caller's lease (after a loader error or panic) so the
-- next reader loads at once instead of waiting for the lease to expire.
-- KEYS[1]  the entry key
-- ARGV[1]  the caller's 16-byte lease token
-- Returns 1 when the lease was deleted, 0 when it was no longer there.
local cur = redis.pcall('GET', KEYS[1])
if type(cur) == 'string' and #cur >= 40 and string.sub(cur, 5, 20) == ARGV[1]
    and string.byte(cur, 3) == 3 then
  redis.call('DEL', KEYS[1])
  return 1
end
return 0
