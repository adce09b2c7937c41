#!/bin/bash
# usage: measure.sh OUTDIR
source /work/main/.venv/bin/activate
out=$1; mkdir -p $out
{
echo "# $(date -u)  $(lscpu | grep 'Model name' | sed 's/  */ /g')  nproc=$(nproc)  load: $(cat /proc/loadavg)"
for ver in before after; do
  cd /tmp/fl/$ver
  for shape in "1024 10 4096 1024" "64 10 3584 512"; do
    variants="unfused fused"; [ $ver = after ] && variants="unfused fused gemms"
    for v in $variants; do
      echo "[$ver] $(python -m benchmarks.fused_linear_rss $v 1 --shape $shape --repeat 5 | awk '{print $1, $2, $3}' | tr '\n' ' ')"
    done
  done
done
for ver in before after; do
  cd /tmp/fl/$ver
  echo "[$ver time, 1 thread, interleaved medians (min ratio)] 1024x10x4096->1024: $(PYTHONPATH=/tmp/fl/$ver python /tmp/fl/fltime.py 1024 10 4096 1024 none 1 5)"
  echo "[$ver time, 1 thread, interleaved medians (min ratio)] 64x10x3584->512: $(PYTHONPATH=/tmp/fl/$ver python /tmp/fl/fltime.py 64 10 3584 512 none 1 31)"
done
echo "# end $(date -u) load: $(cat /proc/loadavg)"
} 2>&1 | tee $out/measure.txt
