-- extend: renew the caller's lease while its load is still running: the
-- key's lifetime for a lease, the deadline in the header for a refreshing
-- entry (which keeps its value's lifetime, at least the lease's).
-- KEYS[1]  the entry key
-- ARGV[1]  the caller's 16-byte lease token
-- ARGV[2]  new lifetime in milliseconds
-- Returns 1 when renewed, 0 when the lease is gone.
local cur = redis.pcall('GET', KEYS[1])
if type(cur) == 'string' and #cur >= 40 and string.sub(cur, 5, 20) == ARGV[1] then
  local kind = string.byte(cur, 3)
  if kind == 3 then
    redis.call('PEXPIRE', KEYS[1], ARGV[2])
    return 1
  end
  if kind == 4 then
    local t = redis.call('TIME')
    local d = (tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000) + tonumber(ARGV[2])) % 4294967296
    redis.call('SETRANGE', KEYS[1], 28, string.char(math.floor(d / 16777216) % 256, math.floor(d / 65536) % 256, math.floor(d / 256) % 256, d % 256))
    if redis.call('PTTL', KEYS[1]) < tonumber(ARGV[2]) then
      redis.call('PEXPIRE', KEYS[1], ARGV[2])
    end
    return 1
  end
end
return 0
