# bench/chart.gp: requests/s and p99 latency per scenario.
# gnuplot -e "datafile='summary.dat'; outfile='chart.png'" bench/chart.gp
# datafile columns: scenario rps p50_ms p99_ms ratio

set terminal pngcairo size 1100,460 font "sans,10"
set output outfile

set style fill solid 0.8 border -1
set boxwidth 0.6
set grid ytics
set xtics nomirror rotate by -20
set key off
set termoption noenhanced
set yrange [0:*]

set multiplot layout 1,2 title "llmlimit benchmark: nginx 1 worker, 64 keep-alive connections (medians)"

set title "requests/s (higher is better)"
set ylabel "requests/s"
plot datafile using 0:2:xtic(1) with boxes lc rgb "#3b7dd8", \
     '' using 0:2:(sprintf("%.0f\n(%s)", $2, strcol(5) eq "NaN" ? "-" : strcol(5))) \
        with labels offset 0,1.5 font "sans,9"

set title "p99 latency (lower is better)"
set ylabel "ms"
plot datafile using 0:4:xtic(1) with boxes lc rgb "#d8743b", \
     '' using 0:4:(sprintf("%.2f", $4)) with labels offset 0,0.7 font "sans,9"

unset multiplot
