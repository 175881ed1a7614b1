from riskpipe.cli import main

main()
