-- extend: renew the caller's lease while its load is still running.
-- KEYS[1]  the entry key
-- ARGV[1]  the caller's 16-byte lease token
-- ARGV[2]  new lifetime in milliseconds
-- Returns 1 when renewed, 0 when the lease is gone.
local cur = redis.pcall('GET', KEYS[1])
if type(cur) == 'string' and #cur >= 40 and string.sub(cur, 5, 20) == ARGV[1] then
  local kind = string.byte(cur, 3)
  if kind == 3 or kind == 4 then
    redis.call('PEXPIRE', KEYS[1], ARGV[2])
    return 1
  end
end
return 0
